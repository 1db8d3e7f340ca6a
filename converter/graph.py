"""ONNX graph plumbing the variants share: signatures, normalisation, pinned shapes, and a
scratch working directory for foreign tools.

- :func:`io_info`: the inputs (initializers excluded) and outputs with numpy dtypes.
- :func:`normalize`: a self-contained copy with ``Constant``-node tensors turned into
  initializers (what quantizers expect weights to be) and dims pinned by ``--input-shape``.
- :func:`restore_io`: put the original input/output dims back after work on a copy with
  pinned dims (symbolic dims stay symbolic in what ships).
- :func:`scratch_cwd`: onnxruntime's shape inference writes ``sym_shape_infer_temp.onnx``
  and ``<uuid>.data`` files into the current directory when it fails; foreign tools run
  inside a temporary one so the user's directory stays clean.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from edgeship.converter.errors import InputError
from edgeship.converter.samples import TensorInfo, first_line

logger = logging.getLogger(__name__)


def np_dtype_name(elem_type: int) -> str | None:
    from onnx import helper

    try:
        return str(helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, ValueError, TypeError):
        return None


def _info(value) -> TensorInfo:
    t = value.type.tensor_type
    dtype = np_dtype_name(t.elem_type) if value.type.HasField("tensor_type") else None
    dims = list(t.shape.dim) if t.HasField("shape") else []
    shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                  for d in dims)
    names = tuple(d.dim_param or None for d in dims)
    return TensorInfo(value.name, dtype or "unsupported", shape, names)


def io_info(model_or_path) -> tuple[tuple[TensorInfo, ...], tuple[TensorInfo, ...]]:
    """Graph inputs that are not initializers, and graph outputs."""
    import onnx

    model = model_or_path if isinstance(model_or_path, onnx.ModelProto) else onnx.load(
        str(model_or_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return (tuple(_info(v) for v in model.graph.input if v.name not in inits),
            tuple(_info(v) for v in model.graph.output))


def constants_to_initializers(model) -> int:
    """Turn top-level ``Constant`` nodes holding a tensor into initializers, in place;
    returns how many. Constants that are graph outputs stay nodes."""
    from onnx import helper, numpy_helper

    outputs = {o.name for o in model.graph.output}
    keep, moved = [], 0
    for node in model.graph.node:
        tensor = _constant_tensor(node, helper, numpy_helper) \
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") else None
        if tensor is None or node.output[0] in outputs:
            keep.append(node)
            continue
        tensor.name = node.output[0]
        model.graph.initializer.append(tensor)
        moved += 1
    if moved:
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return moved


def _constant_tensor(node, helper, numpy_helper):
    import numpy as np

    for attr in node.attribute:
        if attr.name == "value":
            out = type(attr.t)()
            out.CopyFrom(attr.t)
            return out
        values = {"value_float": (attr.f, np.float32), "value_int": (attr.i, np.int64),
                  "value_floats": (list(attr.floats), np.float32),
                  "value_ints": (list(attr.ints), np.int64)}
        if attr.name in values:
            v, dt = values[attr.name]
            return numpy_helper.from_array(np.asarray(v, dtype=dt))
    return None


def pin_dims(model, pins: Mapping[str, Sequence[int]]) -> None:
    """Set the dims of the named graph inputs, in place (``--input-shape name=1,3,320,320``)."""
    inits = {i.name for i in model.graph.initializer}
    inputs = {v.name: v for v in model.graph.input if v.name not in inits}
    for name, dims in pins.items():
        if not name and len(inputs) == 1:
            name = next(iter(inputs))
        if name not in inputs:
            raise InputError(f"--input-shape {name or ''}: the model has no input "
                             f"{name!r} (inputs: {list(inputs)}; say NAME=DIMS)",
                             key="input_shape")
        shape = inputs[name].type.tensor_type.shape
        if len(shape.dim) != len(dims):
            raise InputError(f"--input-shape {name}: {len(dims)} dims given, the input has "
                             f"{len(shape.dim)}", key="input_shape")
        for d, value in zip(shape.dim, dims):
            if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != value:
                raise InputError(f"--input-shape {name}: dim {d.dim_value} is fixed in the "
                                 f"model, got {value}", key="input_shape")
            d.Clear()
            d.dim_value = int(value)


def normalize(src: str | os.PathLike, dst: Path, shown: str,
              pins: Mapping[str, Sequence[int]] | None = None) -> Path:
    """A self-contained, checked copy of the ONNX file ``src`` at ``dst`` (see module doc).

    ``shown`` is how errors name the file (the user's path, never a temp file)."""
    import onnx

    try:
        model = onnx.load(str(src), load_external_data=True)
    except Exception as e:  # noqa: BLE001 - protobuf errors, missing external data
        raise InputError(f"{shown}: not a readable ONNX model ({type(e).__name__}: "
                         f"{first_line(e)})") from e
    moved = constants_to_initializers(model)
    if moved:
        logger.info("%s: %d Constant node(s) turned into initializers", shown, moved)
    if pins:
        pin_dims(model, pins)
    try:
        onnx.checker.check_model(model)
        onnx.save_model(model, str(dst), save_as_external_data=False)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{shown}: invalid ONNX model: {first_line(e)}") from e
    return dst


def restore_io(path: Path, original: Path) -> None:
    """Give ``path`` the input/output types of ``original`` and drop its inferred shapes."""
    import onnx

    model = onnx.load(str(path))
    ref = onnx.load(str(original), load_external_data=False)
    by_name = {v.name: v for v in (*ref.graph.input, *ref.graph.output)}
    for value in (*model.graph.input, *model.graph.output):
        if value.name in by_name:
            value.type.CopyFrom(by_name[value.name].type)
    del model.graph.value_info[:]
    onnx.save_model(model, str(path))


def with_fixed_shapes(src: Path, dst: Path, feed: Mapping[str, object]) -> Path:
    """A copy of ``src`` whose inputs have the exact shapes of one calibration sample."""
    import onnx

    model = onnx.load(str(src))
    inits = {i.name for i in model.graph.initializer}
    pins = {v.name: list(getattr(feed[v.name], "shape", ()))
            for v in model.graph.input if v.name not in inits and v.name in feed}
    pin_dims(model, pins)
    onnx.save_model(model, str(dst))
    return dst


def looks_like_transformer(path: Path) -> bool:
    """Attention blocks (Softmax between MatMuls, layer norms): their activations have
    outliers that static INT8 of every operator cannot hold, so only the matrix products
    are quantized there."""
    import collections

    import onnx

    ops = collections.Counter(n.op_type for n in onnx.load(
        str(path), load_external_data=False).graph.node)
    fused = {"Attention", "MultiHeadAttention", "SkipLayerNormalization",
             "LayerNormalization", "SimplifiedLayerNormalization"}
    return bool(fused & set(ops)) or (ops["Softmax"] >= 1 and ops["MatMul"] >= 8 and
                                      ops["ReduceMean"] >= 2)


def compact_names(path: Path) -> int:
    """Short names for every node and inner tensor (graph inputs/outputs keep theirs):
    QDQ graphs spend a large share of their bytes on long generated names. Graphs with
    subgraphs (If/Loop bodies refer to outer names) are left alone. Returns bytes saved."""
    import onnx

    before = path.stat().st_size
    model = onnx.load(str(path))
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for n in graph.node for a in n.attribute):
        return 0
    keep = {v.name for v in (*graph.input, *graph.output)} | {""}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if name in keep:
            return name
        return names.setdefault(name, f"t{len(names):x}")

    for i, node in enumerate(graph.node):
        node.name = f"n{i:x}"
        node.doc_string = ""
        node.input[:] = [short(x) for x in node.input]
        node.output[:] = [short(x) for x in node.output]
    for init in graph.initializer:
        init.name = short(init.name)
        init.doc_string = ""
    for value in graph.value_info:
        value.name = short(value.name)
    model.doc_string = graph.doc_string = ""
    onnx.save_model(model, str(path))
    return before - path.stat().st_size


def opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


@contextlib.contextmanager
def scratch_cwd() -> Iterator[Path]:
    """Run foreign tools inside a fresh temporary working directory (removed after)."""
    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="edgeship-scratch-") as tmp:
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(old)
