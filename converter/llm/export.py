"""Language model → ONNX with a KV cache, and its fp16 / int8 / int4 weight variants.

The fp32 graph comes from ``onnxruntime-genai``'s model builder (run as a child process):
it knows the Llama/Qwen/Phi/Gemma/Mistral families, fuses attention into
``GroupQueryAttention`` with a KV cache, writes ``genai_config.json`` and copies the
tokenizer — the exact shape the device's runtime loads. Weight precisions are made here from
that one fp32 graph with onnxruntime's quantizers, so every variant shares node names (the
accuracy-aware fallback excludes nodes by name) and the quantizer's options (algorithm,
block size, which nodes) are ours to choose per node:

- ``fp16``: float weights stored as float16 with a Cast after each (half the file; a CPU
  session widens them to fp32 when it loads, a GPU keeps them half);
- ``int8`` / ``int4``: block-wise weight-only ``MatMulNBits`` (``MatMulNBitsQuantizer``:
  RTN by default, HQQ or k-quant on request), optionally the embedding ``Gather`` too.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeship.agent.llm.assets import ALLOWED, PREFIX
from edgeship.converter.errors import ExportError, InputError

logger = logging.getLogger(__name__)

MAX_SINGLE_FILE_BYTES = 2 * 1024 ** 3 - 64 * 1024 ** 2  # protobuf's 2 GiB, with headroom
ALGORITHMS = ("rtn", "hqq", "k_quant")
BUILDER_TIMEOUT_S = 3600


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    block_size: int = 32
    algorithm: str = "rtn"
    accuracy_level: int = 4  # int8 activations in MatMulNBits on CPU (measured in bench-llm)
    embeddings: bool = True  # quantize the embedding Gather as well
    symmetric: bool = True


def load_source(source: str, work: Path) -> Path:
    """A Hugging Face checkpoint directory, or ``module:function`` returning
    ``(model, tokenizer)`` (saved with ``save_pretrained`` into ``work``)."""
    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"{path}: no config.json (not a Hugging Face checkpoint)")
        if not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
            raise InputError(f"{path}: no tokenizer.json or tokenizer.model beside the "
                                  "checkpoint")
        return path
    if ":" not in source:
        raise InputError(f"{source}: not a directory and not module:function")
    module_name, fn_name = source.split(":", 1)
    try:
        model, tokenizer = getattr(importlib.import_module(module_name), fn_name)()
    except (ImportError, AttributeError) as e:
        raise ExportError(f"cannot load factory {source}: {e}") from e
    except (TypeError, ValueError) as e:
        raise ExportError(f"factory {source} must return (model, tokenizer): {e}") from e
    out = work / "checkpoint"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def architecture(checkpoint: Path) -> dict:
    config = json.loads((checkpoint / "config.json").read_text())
    if not config.get("architectures"):
        raise ExportError(f"{checkpoint}/config.json names no architecture")
    return config


def build_fp32(checkpoint: Path, out: Path, cache: Path) -> Path:
    """Run onnxruntime-genai's model builder for an fp32 CPU graph into ``out``."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint),
           "-o", str(out), "-p", "fp32", "-e", "cpu", "-c", str(cache)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                              timeout=BUILDER_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise ExportError(f"model builder ran over {BUILDER_TIMEOUT_S} s") from e
    if proc.returncode != 0 or not (out / "model.onnx").is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ExportError("onnxruntime-genai model builder failed on "
                              f"{checkpoint}: {' | '.join(tail)[:500]}")
    return out / "model.onnx"


def assets(builder_dir: Path, checkpoint: Path) -> dict[str, str]:
    """Tokenizer, genai config and generation config to embed in each variant."""
    found = {}
    for name in ALLOWED:
        for where in (builder_dir, checkpoint):
            if (where / name).is_file():
                found[name] = (where / name).read_text()
                break
    return found


def load(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=True)


def save_single(model, out: Path, embedded: dict[str, str]) -> Path:
    """One self-contained file: weights inline, assets as metadata_props."""
    import onnx

    del model.metadata_props[:]
    for name, text in sorted(embedded.items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = PREFIX + name, text
    size = model.ByteSize()
    if size > MAX_SINGLE_FILE_BYTES:
        raise ExportError(f"variant of {size / 1024 ** 3:.2f} GiB exceeds what one ONNX "
                              "file holds (2 GiB); external-data variants are not shipped yet")
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(out))
    return out


def fp16_weights(model, min_elements: int = 1024):
    """Store float initializers of ``min_elements`` or more as float16 + a Cast to float."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    casts = []
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT or np.prod(init.dims) < min_elements:
            continue
        arr = numpy_helper.to_array(init)
        name = init.name
        init.CopyFrom(numpy_helper.from_array(arr.astype(np.float16), name + "_fp16"))
        casts.append(helper.make_node("Cast", [name + "_fp16"], [name], to=TensorProto.FLOAT,
                                      name=f"{name}_fp16_cast"))
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    return model


def untie_embedding(model):
    """Give the embedding Gather its own table when it reads the LM head's weight through a
    Transpose (tied embeddings, as the builder writes them), so each can be quantized as
    its op needs (``GatherBlockQuantized`` rows, ``MatMulNBits`` columns)."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type != "Gather" or node.input[0] in inits:
            continue
        tr = producers.get(node.input[0])
        if tr is None or tr.op_type != "Transpose" or tr.input[0] not in inits:
            continue
        table = numpy_helper.to_array(inits[tr.input[0]]).T.copy()
        name = tr.input[0] + ".embedding"
        graph.initializer.append(numpy_helper.from_array(table, name))
        node.input[0] = name
        if not any(tr.output[0] in n.input for n in graph.node):
            graph.node.remove(tr)
    return model


def quantize(model, spec: QuantSpec, exclude: tuple[str, ...] = (),
             include: tuple[str, ...] | None = None):
    """Block-wise weight-only quantization of MatMul (and embedding Gather) weights."""
    from dataclasses import replace

    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    if spec.algorithm != "rtn" and spec.embeddings:
        # HQQ and k-quant take MatMul weights only: the embedding table gets RTN after them
        model = quantize(model, replace(spec, embeddings=False), exclude, include)
        return quantize(model, replace(spec, algorithm="rtn"), exclude, include)
    ops = ("MatMul", "Gather") if spec.embeddings else ("MatMul",)
    if spec.algorithm not in ALGORITHMS:
        raise ExportError(f"unknown quantization algorithm {spec.algorithm!r} "
                              f"(one of {', '.join(ALGORITHMS)})")
    algo = {
        "rtn": None,
        "hqq": lambda: mnq.HQQWeightOnlyQuantConfig(block_size=spec.block_size,
                                                    bits=spec.bits, op_types_to_quantize=ops),
        "k_quant": lambda: mnq.KQuantWeightOnlyQuantConfig(op_types_to_quantize=ops),
    }[spec.algorithm]
    quantizer = mnq.MatMulNBitsQuantizer(
        model, bits=spec.bits, block_size=spec.block_size, is_symmetric=spec.symmetric,
        accuracy_level=spec.accuracy_level, nodes_to_exclude=list(exclude),
        nodes_to_include=list(include) if include is not None else None,
        op_types_to_quantize=ops, algo_config=algo() if algo else None)
    _quiet(quantizer.process)
    return quantizer.model.model


def _quiet(fn):
    """onnxruntime's quantizer logs every node at INFO; keep that out of our output."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        return fn()
    finally:
        root.setLevel(level)


def quantizable_nodes(model, embeddings: bool = True) -> list[str]:
    """Names of the weight nodes the quantizer would touch (constant weights only)."""
    inits = {i.name for i in model.graph.initializer}
    ops = ("MatMul", "Gather") if embeddings else ("MatMul",)
    return [n.name for n in model.graph.node
            if n.op_type in ops and n.input[1 if n.op_type == "MatMul" else 0] in inits]


def weights_mb(model) -> float:
    """Weights as a CPU session holds them (fp16 initializers widened to fp32)."""
    from onnx import TensorProto

    total = 0
    for init in model.graph.initializer:
        n = int(np.prod(init.dims)) if init.dims else 1
        bytes_per = {TensorProto.FLOAT: 4, TensorProto.FLOAT16: 4, TensorProto.INT64: 8,
                     TensorProto.INT32: 4, TensorProto.INT4: 0.5,
                     TensorProto.UINT4: 0.5}.get(init.data_type, 1)
        total += n * bytes_per
    return total / 1024 ** 2


def clean(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
