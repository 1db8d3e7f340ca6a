"""Inference runtimes behind one small interface (``ModelRuntime``)."""

from __future__ import annotations

import importlib.util
import logging
import threading
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from agent.errors import EdgeshipError, InferenceInputError, Reason
from agent.manifest import TensorSpec

logger = logging.getLogger(__name__)


class ModelRuntime(Protocol):
    """What the agent needs from an inference engine."""

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class RuntimeLoadError(EdgeshipError):
    reason_code = Reason.HEALTH_CHECK_FAILED


#: Execution providers we know how to use, fastest first (a Jetson has all three).
KNOWN_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider",
                   "CPUExecutionProvider")


def available_onnx_providers() -> list[str]:
    import onnxruntime as ort
    return list(ort.get_available_providers())


def choose_providers(wanted: Sequence[str], available: Sequence[str]) -> tuple[str, ...]:
    """The profile's providers that this onnxruntime build has, in the profile's order,
    always ending with the CPU provider (pure)."""
    chosen = [p for p in wanted if p in available and p != "CPUExecutionProvider"]
    return tuple(chosen) + ("CPUExecutionProvider",)


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


# --- LiteRT (ai-edge-litert) and the tflite-runtime fallback -------------------------------

def numpy_major() -> int:
    return int(np.__version__.split(".")[0])


def litert_backend() -> str | None:
    """Which TFLite interpreter package this device can use: ``ai_edge_litert``, else
    ``tflite_runtime`` (only with NumPy < 2), else None. Imports nothing heavy."""
    if importlib.util.find_spec("ai_edge_litert") is not None:
        return "ai_edge_litert"
    if importlib.util.find_spec("tflite_runtime") is not None and numpy_major() < 2:
        return "tflite_runtime"
    return None


def _interpreter_class() -> Any:
    backend = litert_backend()
    if backend == "ai_edge_litert":
        from ai_edge_litert.interpreter import Interpreter
        return Interpreter
    if backend == "tflite_runtime":
        from tflite_runtime.interpreter import Interpreter  # type: ignore[import-not-found]
        return Interpreter
    if importlib.util.find_spec("tflite_runtime") is not None:
        raise RuntimeLoadError(
            f"tflite-runtime is installed but needs NumPy < 2 (this device has NumPy "
            f"{np.__version__}): pip install ai-edge-litert, or pin numpy<2",
            reason_code=Reason.NO_COMPATIBLE_VARIANT)
    raise RuntimeLoadError("no LiteRT interpreter: pip install 'edgeship[tflite]' "
                           "(ai-edge-litert)", reason_code=Reason.NO_COMPATIBLE_VARIANT)


class LiteRtModel:
    """A TFLite interpreter. Inputs are matched by name, else by position. A batch size
    other than the allocated one resizes the inputs when the model's batch dimension is
    dynamic; a model exported with a fixed batch of 1 (litert-torch does that) runs the
    rows one by one. The interpreter is not thread-safe, so calls are serialised."""

    def __init__(self, path: Path, *, threads: int = 0) -> None:
        interpreter = _interpreter_class()
        try:
            self._interp = interpreter(model_path=str(path), num_threads=threads or None)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise RuntimeLoadError(f"LiteRT cannot load {path.name}: {e}") from e
        details = self._interp.get_input_details()
        self._names = [d["name"] for d in details]
        self._slots = [(d["index"], tuple(d["shape"])) for d in details]
        signatures = [tuple(d.get("shape_signature", d["shape"])) for d in details]
        self._fixed_batch_1 = all(sig and sig[0] == 1 for sig in signatures)
        self._outputs = [d["index"] for d in self._interp.get_output_details()]
        self._lock = threading.Lock()
        self.providers = ["litert-cpu"]

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        arrays = self._match(inputs)
        batch = arrays[0].shape[0] if arrays and arrays[0].ndim else 1
        with self._lock:
            if self._fixed_batch_1 and batch != 1:
                rows = [self._invoke([a[r:r + 1] for a in arrays]) for r in range(batch)]
                return [np.concatenate(outs) for outs in zip(*rows)]
            return self._invoke(arrays)

    def _invoke(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        for i, ((index, shape), arr) in enumerate(zip(self._slots, arrays)):
            if shape != arr.shape:
                try:
                    self._interp.resize_tensor_input(index, list(arr.shape))
                    self._interp.allocate_tensors()
                except (ValueError, RuntimeError) as e:
                    raise InferenceInputError(f"this LiteRT model cannot take shape "
                                              f"{list(arr.shape)}: {e}") from e
                self._slots[i] = (index, arr.shape)
            self._interp.set_tensor(index, arr)
        self._interp.invoke()
        return [self._interp.get_tensor(i) for i in self._outputs]

    def _match(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        if len(inputs) != len(self._names):
            raise InferenceInputError(f"model takes {len(self._names)} inputs, "
                                      f"got {len(inputs)}")
        if len(inputs) == 1:
            return list(inputs.values())
        if all(n in inputs for n in self._names):
            return [inputs[n] for n in self._names]
        return list(inputs.values())  # names differ after conversion: by position


def load_runtime(runtime: str, path: Path, *, threads: int = 0,
                 providers: Sequence[str] | None = None) -> ModelRuntime:
    if runtime == "onnxruntime":
        return OnnxModel(path, threads=threads, providers=providers)
    if runtime == "litert":
        return LiteRtModel(path, threads=threads)
    raise RuntimeLoadError(f"runtime {runtime!r} is not available on this agent",
                           reason_code=Reason.NO_COMPATIBLE_VARIANT)


def available_runtimes() -> tuple[str, ...]:
    """Runtimes this agent can load right now."""
    found = []
    if importlib.util.find_spec("onnxruntime") is not None:
        found.append("onnxruntime")
    if litert_backend() is not None:
        found.append("litert")
    return tuple(found)


def coerce_inputs(specs: Sequence[TensorSpec], raw: dict[str, object] | object,
                  *, max_batch: int = 1024) -> dict[str, np.ndarray]:
    """Check a request against the model's input signature: names, rank, fixed dims, dtype.

    ``raw`` is either a dict name → array-like, or (for single-input models) the array."""
    if not isinstance(raw, dict):
        if len(specs) != 1:
            raise InferenceInputError("model has several inputs: send an object by name")
        return {specs[0].name: _coerce_one(specs[0], raw, max_batch)}  # the common case
    missing = [s.name for s in specs if s.name not in raw]
    extra = sorted(set(raw) - {s.name for s in specs})
    if missing or extra:
        raise InferenceInputError(f"inputs missing {missing} / unexpected {extra}")
    return {s.name: _coerce_one(s, raw[s.name], max_batch) for s in specs}


_DTYPE_CACHE: dict[str, np.dtype] = {}


def _dtype(name: str) -> np.dtype:
    dt = _DTYPE_CACHE.get(name)
    if dt is None:
        dt = _DTYPE_CACHE[name] = np.dtype(name)
    return dt


def _coerce_one(spec: TensorSpec, value: object, max_batch: int) -> np.ndarray:
    want = _dtype(spec.dtype)
    if isinstance(value, np.ndarray) and value.dtype == want:
        arr = value  # the hot path (.npy bodies, in-process callers): no copy, no casts
    else:
        arr = _convert(spec, value, want)
    if arr.ndim != len(spec.shape):
        raise InferenceInputError(f"input {spec.name!r}: expected rank {len(spec.shape)} "
                                  f"{_shape_str(spec.shape)}, got shape {list(arr.shape)}")
    for got, expected in zip(arr.shape, spec.shape):
        if expected is not None and got != expected:
            raise InferenceInputError(f"input {spec.name!r}: expected shape "
                                      f"{_shape_str(spec.shape)}, got {list(arr.shape)}")
    if arr.ndim and arr.shape[0] > max_batch:
        raise InferenceInputError(f"batch of {arr.shape[0]} exceeds {max_batch}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InferenceInputError(f"input {spec.name!r} contains NaN or infinity")
    return arr


def _convert(spec: TensorSpec, value: object, want: np.dtype) -> np.ndarray:
    if isinstance(value, np.ndarray) and \
            not np.can_cast(value.dtype, want, casting="same_kind"):
        raise InferenceInputError(f"input {spec.name!r}: dtype {value.dtype} cannot be "
                                  f"used as {spec.dtype}")
    try:
        return np.asarray(value, dtype=want)
    except (TypeError, ValueError, OverflowError) as e:
        raise InferenceInputError(f"input {spec.name!r} is not a {spec.dtype} array: "
                                  f"{e}") from e


def _shape_str(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"
