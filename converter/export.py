"""PyTorch module → one self-contained fp32 ONNX file with a dynamic batch dimension.

The torch.export-based ("dynamo") exporter is tried first; if it fails on a model, the
TorchScript exporter is tried before giving up. Either way the result is checked with
``onnx.checker`` and loaded once by onnxruntime before it is returned.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeship.converter.errors import ExportError

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"


@dataclass(frozen=True)
class ExportSettings:
    opset: int = 18
    prefer_dynamo: bool = True
    optimize: bool = False  # run onnxruntime's basic graph optimizations offline


def output_names(model, example) -> list[str]:
    """``logits`` for one output, else ``output_0``, ``output_1``, ... (dict keys kept)."""
    import torch

    with torch.no_grad():
        out = model(example)
    if isinstance(out, dict):
        return [str(k) for k in out]
    if isinstance(out, (tuple, list)):
        return [f"output_{i}" for i in range(len(out))] if len(out) != 1 else [OUTPUT_NAME]
    return [OUTPUT_NAME]


def export_onnx(model, example_input, out_path: str | os.PathLike,
                settings: ExportSettings = ExportSettings()) -> Path:
    """Export ``model`` (an ``nn.Module``) to ``out_path``; returns the path written."""
    import torch

    from edgeship.converter.samples import first_line

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    example = torch.as_tensor(np.asarray(example_input, dtype=np.float32))
    try:
        names = output_names(model, example)
    except Exception as e:  # noqa: BLE001 - the user's model raises anything
        raise ExportError(f"could not export {type(model).__name__} to ONNX: it fails on "
                          f"the example input: {type(e).__name__}: {first_line(e)}") from e
    errors: list[str] = []
    exporters = [_export_dynamo, _export_torchscript]
    if not settings.prefer_dynamo:
        exporters.reverse()
    for exporter in exporters:
        try:
            exporter(model, example, out, settings.opset, names)
            break
        except Exception as e:  # noqa: BLE001 - foreign exporters raise anything
            logger.info("%s failed: %s", exporter.__name__, first_line(e))
            errors.append(f"{exporter.__name__}: {type(e).__name__}: {first_line(e, 200)}")
    else:
        raise ExportError(f"could not export {type(model).__name__} to ONNX: "
                          + " | ".join(errors))
    _inline_external_data(out)
    check_onnx(out, names)
    if settings.optimize:
        optimize_onnx(out, out)
    return out


def _export_dynamo(model, example, out: Path, opset: int, names: list[str]) -> None:
    import torch

    dim = torch.export.Dim(BATCH_DIM)
    program = getattr(model, "program", None)  # a loaded .pt2 keeps its own dynamic shapes
    if program is not None:
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(program, (example,), str(out), dynamo=True,
                              opset_version=opset, input_names=[INPUT_NAME],
                              output_names=names, external_data=False)
        return
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(
            model, (example,), str(out), dynamo=True, opset_version=opset,
            input_names=[INPUT_NAME], output_names=names,
            dynamic_shapes=({0: dim},), external_data=False, verbose=False)


def _export_torchscript(model, example, out: Path, opset: int, names: list[str]) -> None:
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (example,), str(out), dynamo=False, opset_version=min(opset, 17),
            input_names=[INPUT_NAME], output_names=names,
            dynamic_axes={n: {0: BATCH_DIM} for n in (INPUT_NAME, *names)})


def _inline_external_data(path: Path) -> None:
    """Make sure the file is self-contained (small models only: < 2 GiB protobuf)."""
    import onnx

    model = onnx.load(str(path), load_external_data=True)
    onnx.save_model(model, str(path), save_as_external_data=False)
    leftover = path.with_name(path.name + ".data")
    if leftover.exists():
        leftover.unlink()


def check_onnx(path: str | os.PathLike, names: list[str] | None = None) -> None:
    """Run ``onnx.checker`` and verify the input/output names; raise :class:`ExportError`."""
    import onnx

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{path}: exported ONNX model is invalid: {e}") from e
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    want = names or [OUTPUT_NAME]
    if inputs != [INPUT_NAME] or outputs != want:
        raise ExportError(f"{path}: expected input {INPUT_NAME!r} and outputs {want}, got "
                          f"inputs {inputs} outputs {outputs}")


def optimize_onnx(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Apply onnxruntime's basic (hardware-independent) graph optimizations offline."""
    import onnxruntime as ort

    tmp = Path(dst).with_name(Path(dst).name + ".opt.tmp")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(tmp)
    try:
        ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        tmp.unlink(missing_ok=True)
        raise ExportError(f"{src}: onnxruntime cannot load the exported model: {e}") from e
    os.replace(tmp, dst)
    return Path(dst)


def with_constants(model, const_kwargs=None):
    """``model`` whose ``forward(x)`` also passes the constant non-tensor arguments (e.g.
    ``sr=16000``) every time; the model itself when there are none."""
    if not const_kwargs:
        return model
    import torch

    class WithConstants(torch.nn.Module):
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x, **const_kwargs)

    return WithConstants(model).eval()
