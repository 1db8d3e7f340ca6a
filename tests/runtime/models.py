"""Small real models for runtime tests: a dense+softmax layer as ONNX and as TFLite, wrapped
the way the agent serves them (manifest, variant, LoadedModel)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeship.agent.manifest import Manifest, TensorSpec, Variant
from edgeship.agent.runtime import load_runtime
from edgeship.agent.serving import LoadedModel, ModelServer
from edgeship.agent.store import InstalledModel

IN_DIM, OUT_DIM = 8, 3


def weights(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(OUT_DIM, IN_DIM)).astype(np.float32), \
        rng.normal(size=OUT_DIM).astype(np.float32)


def write_dense_onnx(path: Path, w: np.ndarray, b: np.ndarray) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["logits"], transB=1),
         helper.make_node("Softmax", ["logits"], ["probs"], axis=1)],
        "dense", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[1]])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", w.shape[0]])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def manifest_for(file: str, runtime: str, precision: str = "fp32") -> Manifest:
    variant = Variant(id=f"{runtime}-{precision}", runtime=runtime, precision=precision,
                      file=file, sha256="0" * 64, size=1)
    return Manifest(model="dense", version=1, task="classification",
                    inputs=(TensorSpec("x", "float32", (None, IN_DIM)),),
                    outputs=(TensorSpec("probs", "float32", (None, OUT_DIM)),),
                    variants=(variant,), golden_file="golden.npz", golden_sha256="0" * 64,
                    golden_size=1)


def serve(path: Path, runtime: str, server: ModelServer | None = None,
          threads: int = 1) -> ModelServer:
    server = server or ModelServer()
    manifest = manifest_for(path.name, runtime)
    inst = InstalledModel(model="dense", version=1, variant=manifest.variants[0],
                          manifest=manifest, directory=path.parent)
    server.swap(LoadedModel(inst, load_runtime(runtime, path, threads=threads)))
    return server
