"""Inference runtimes behind one small interface (``ModelRuntime``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from agent.errors import EdgeshipError, InferenceInputError, Reason
from agent.manifest import TensorSpec

logger = logging.getLogger(__name__)


class ModelRuntime(Protocol):
    """What the agent needs from an inference engine."""

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class RuntimeLoadError(EdgeshipError):
    reason_code = Reason.HEALTH_CHECK_FAILED


def available_onnx_providers() -> list[str]:
    import onnxruntime as ort
    return list(ort.get_available_providers())


class OnnxModel:
    """An onnxruntime session pinned to a thread count and the best available provider."""

    def __init__(self, path: Path, *, threads: int = 0,
                 providers: Sequence[str] | None = None) -> None:
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        chosen = list(providers) if providers else ["CPUExecutionProvider"]
        try:
            self._session = ort.InferenceSession(str(path), sess_options=opts,
                                                 providers=chosen)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise RuntimeLoadError(f"onnxruntime cannot load {path.name}: {e}") from e
        self.providers = self._session.get_providers()
        self._output_names = [o.name for o in self._session.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._session.run(self._output_names, inputs)


def load_runtime(runtime: str, path: Path, *, threads: int = 0,
                 providers: Sequence[str] | None = None) -> ModelRuntime:
    if runtime == "onnxruntime":
        return OnnxModel(path, threads=threads, providers=providers)
    raise RuntimeLoadError(f"runtime {runtime!r} is not available on this agent",
                           reason_code=Reason.NO_COMPATIBLE_VARIANT)


def coerce_inputs(specs: Sequence[TensorSpec], raw: dict[str, object] | object,
                  *, max_batch: int = 1024) -> dict[str, np.ndarray]:
    """Check a request against the model's input signature: names, rank, fixed dims, dtype.

    ``raw`` is either a dict name → array-like, or (for single-input models) the array."""
    if not isinstance(raw, dict):
        if len(specs) != 1:
            raise InferenceInputError("model has several inputs: send an object by name")
        raw = {specs[0].name: raw}
    missing = [s.name for s in specs if s.name not in raw]
    extra = sorted(set(raw) - {s.name for s in specs})
    if missing or extra:
        raise InferenceInputError(f"inputs missing {missing} / unexpected {extra}")
    return {s.name: _coerce_one(s, raw[s.name], max_batch) for s in specs}


def _coerce_one(spec: TensorSpec, value: object, max_batch: int) -> np.ndarray:
    if isinstance(value, np.ndarray) and value.dtype != np.dtype(spec.dtype) and \
            not np.can_cast(value.dtype, spec.dtype, casting="same_kind"):
        raise InferenceInputError(f"input {spec.name!r}: dtype {value.dtype} cannot be "
                                  f"used as {spec.dtype}")
    try:
        arr = np.asarray(value, dtype=spec.dtype)
    except (TypeError, ValueError, OverflowError) as e:
        raise InferenceInputError(f"input {spec.name!r} is not a {spec.dtype} array: "
                                  f"{e}") from e
    if arr.ndim != len(spec.shape):
        raise InferenceInputError(f"input {spec.name!r}: expected rank {len(spec.shape)} "
                                  f"{_shape_str(spec.shape)}, got shape {list(arr.shape)}")
    for got, want in zip(arr.shape, spec.shape):
        if want is not None and got != want:
            raise InferenceInputError(f"input {spec.name!r}: expected shape "
                                      f"{_shape_str(spec.shape)}, got {list(arr.shape)}")
    if arr.ndim and arr.shape[0] > max_batch:
        raise InferenceInputError(f"batch of {arr.shape[0]} exceeds {max_batch}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise InferenceInputError(f"input {spec.name!r} contains NaN or infinity")
    return arr


def _shape_str(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"
