"""Inference runtimes behind one small interface (``ModelRuntime``)."""

from __future__ import annotations

import importlib.util
import logging
import threading
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from edgeship.agent.errors import InferenceInputError, Reason, RuntimeLoadError
from edgeship.agent.manifest import TensorSpec
from edgeship.agent.signature import IOSpec

logger = logging.getLogger(__name__)


class ModelRuntime(Protocol):
    """What the agent needs from an inference engine."""

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]: ...


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


_ONNX_DTYPES = {f"tensor({t})": n for t, n in (
    ("float", "float32"), ("double", "float64"), ("float16", "float16"), ("int8", "int8"),
    ("uint8", "uint8"), ("int16", "int16"), ("uint16", "uint16"), ("int32", "int32"),
    ("uint32", "uint32"), ("int64", "int64"), ("uint64", "uint64"), ("bool", "bool"))}


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
        self._n_inputs = len(self._session.get_inputs())
        self._c_run = _c_level_run(self._session)
        from onnxruntime.capi.onnxruntime_pybind11_state import EPFail
        self._ep_fail = EPFail

    def signature(self) -> tuple[tuple[IOSpec, ...], tuple[IOSpec, ...]]:
        """The session's inputs and outputs (symbolic dimensions are dynamic)."""
        def spec(arg: Any) -> IOSpec:
            dims = tuple(d if isinstance(d, int) and d >= 0 else None for d in arg.shape or ())
            return IOSpec(arg.name, _ONNX_DTYPES.get(arg.type, arg.type), dims)
        return (tuple(spec(a) for a in self._session.get_inputs()),
                tuple(spec(a) for a in self._session.get_outputs()))

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The session's C-level run with the output names resolved at load. With every
        input given, the C++ side checks names, ranks, dims and types itself; anything else
        (a missing input, a provider failure to fall back from) takes the public
        ``InferenceSession.run`` with its checks and provider fallback."""
        if len(inputs) == self._n_inputs:
            try:
                return self._c_run(self._output_names, inputs, None)
            except self._ep_fail:
                logger.warning("execution provider failed; retrying through onnxruntime's "
                               "provider fallback")
        outputs = self._session.run(self._output_names, inputs)
        self._c_run = _c_level_run(self._session)  # a fallback replaces the C session
        self.providers = self._session.get_providers()
        return outputs


def _c_level_run(session: Any) -> Any:
    """``InferenceSession._sess.run`` (what the public ``run`` calls after its Python-side
    checks), or the public ``run`` where a future onnxruntime has no ``_sess``."""
    c_session = getattr(session, "_sess", None)
    run = getattr(c_session, "run", None)
    return run if callable(run) else session.run


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
        from tflite_runtime.interpreter import Interpreter
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
    rows one by one. The interpreter is not thread-safe, so calls
    are serialised. Requests call the wrapper's C-level ``SetTensor`` / ``Invoke`` /
    ``GetTensor`` (what the public ``set_tensor`` / ``invoke`` / ``get_tensor`` call; the
    agent never holds views into the interpreter, the case ``invoke``'s check is for)."""

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
        outputs = self._interp.get_output_details()
        self._outputs = [d["index"] for d in outputs]
        # full-integer models (converter variant tflite-int8) take and give int8/uint8
        # tensors: float requests are quantized with the tensor's scale and zero point, and
        # the outputs dequantized back to float32 (what the manifest and the golden say)
        self._qin = [_quantization(d) for d in details]
        self._qout = [_quantization(d) for d in outputs]
        self._quantized = any(self._qin) or any(self._qout)
        c_level = getattr(self._interp, "_interpreter", None)
        # another wrapper version: use the public methods
        self._c_level = all(hasattr(c_level, m) for m in ("SetTensor", "Invoke", "GetTensor"))
        # one input, one output, C-level calls: a request at the allocated shape takes
        # ``_run_single`` (the common case: a batch of 1, or the size last resized to)
        self._single = self._c_level and len(self._slots) == 1 and len(self._outputs) == 1 \
            and not self._quantized
        self._lock = threading.Lock()
        self.providers = ["litert-cpu"]

    #: TFLite converters rename tensors ("serving_default_x:0"): match by position
    signature_by_position = True

    def signature(self) -> tuple[tuple[IOSpec, ...], tuple[IOSpec, ...]]:
        def spec(d: dict) -> IOSpec:
            dims = tuple(int(x) if x >= 0 else None
                         for x in d.get("shape_signature", d["shape"]))
            return IOSpec(d["name"], np.dtype(d["dtype"]).name, dims)
        return (tuple(spec(d) for d in self._interp.get_input_details()),
                tuple(spec(d) for d in self._interp.get_output_details()))

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self._single and len(inputs) == 1:
            outputs = self._run_single(*inputs.values())
            if outputs is not None:
                return outputs
        arrays = self._match(inputs)
        if self._quantized:
            arrays = [_quantize(a, q) for a, q in zip(arrays, self._qin)]
        first = arrays[0] if arrays else None
        batch = first.shape[0] if first is not None and first.ndim else 1
        with self._lock:
            if self._fixed_batch_1 and batch != 1:
                outputs = self._rows(arrays, batch)
            else:
                outputs = self._invoke(arrays)
        if self._quantized:
            outputs = [_dequantize(o, q) for o, q in zip(outputs, self._qout)]
        return outputs

    def _run_single(self, arr: np.ndarray) -> list[np.ndarray] | None:
        """set, invoke, get when ``arr`` fits the allocated input as it is; else None."""
        with self._lock:
            (index, shape), = self._slots  # under the lock: another request may resize
            if arr.shape != shape:
                return None
            c = self._interp._interpreter  # never kept on self: see _calls
            c.SetTensor(index, arr)
            c.Invoke()
            return [c.GetTensor(self._outputs[0])]

    def _calls(self) -> tuple[Any, Any, Any]:
        """set, invoke, get for this request. Never kept on ``self``: a reference held to
        the C-level interpreter makes ``allocate_tensors`` refuse to run."""
        if self._c_level:
            c = self._interp._interpreter
            return c.SetTensor, c.Invoke, c.GetTensor
        return self._interp.set_tensor, self._interp.invoke, self._interp.get_tensor

    def _invoke(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        for i, arr in enumerate(arrays):
            if self._slots[i][1] != arr.shape:
                self._resize(i, arr.shape)
        set_tensor, invoke, get_tensor = self._calls()
        for (index, _), arr in zip(self._slots, arrays):
            set_tensor(index, arr)
        invoke()
        return [get_tensor(i) for i in self._outputs]

    def _rows(self, arrays: list[np.ndarray], batch: int) -> list[np.ndarray]:
        """A batch through a model with a fixed batch of 1: row by row (each row a view,
        each output row one copy), then one concatenation per output."""
        if self._single:
            return [self._rows_single(arrays[0], batch)]
        slots = [index for index, _ in self._slots]
        rows: list[list[np.ndarray]] = [[] for _ in self._outputs]
        set_tensor, invoke, get_tensor = self._calls()
        for r in range(batch):
            for index, arr in zip(slots, arrays):
                set_tensor(index, arr[r:r + 1])
            invoke()
            for out, index in zip(rows, self._outputs):
                out.append(get_tensor(index))
        return [np.concatenate(out) for out in rows]

    def _rows_single(self, arr: np.ndarray, batch: int) -> np.ndarray:
        """``_rows`` for one input and one output, with the C-level calls."""
        (index, _), = self._slots
        out_index = self._outputs[0]
        c = self._interp._interpreter  # never kept on self: see _calls
        outs = []
        for r in range(batch):
            c.SetTensor(index, arr[r:r + 1])
            c.Invoke()
            outs.append(c.GetTensor(out_index))
        return np.concatenate(outs)

    def _resize(self, i: int, shape: tuple[int, ...]) -> None:
        index = self._slots[i][0]
        try:
            self._interp.resize_tensor_input(index, list(shape))
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise InferenceInputError(f"this LiteRT model cannot take shape "
                                      f"{list(shape)}: {e}") from e
        self._slots[i] = (index, shape)

    def _match(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        if len(inputs) != len(self._names):
            raise InferenceInputError(f"model takes {len(self._names)} inputs, "
                                      f"got {len(inputs)}")
        if len(inputs) == 1:
            return list(inputs.values())
        if all(n in inputs for n in self._names):
            return [inputs[n] for n in self._names]
        return list(inputs.values())  # names differ after conversion: by position


def _quantization(detail: dict[str, Any]) -> tuple[float, int, Any] | None:
    """(scale, zero point, dtype) of an int8/uint8 tensor with quantization, else None."""
    scale, zero = detail.get("quantization", (0.0, 0))
    if detail["dtype"] in (np.int8, np.uint8) and scale:
        return float(scale), int(zero), detail["dtype"]
    return None


def _quantize(arr: np.ndarray, q: tuple[float, int, Any] | None) -> np.ndarray:
    if q is None or arr.dtype.kind != "f":
        return arr
    scale, zero, dtype = q
    info = np.iinfo(dtype)
    return np.clip(np.round(arr / scale + zero), info.min, info.max).astype(dtype)


def _dequantize(arr: np.ndarray, q: tuple[float, int, Any] | None) -> np.ndarray:
    if q is None:
        return arr
    scale, zero, _ = q
    return (arr.astype(np.float32) - zero) * np.float32(scale)


def load_runtime(runtime: str, path: Path, *, threads: int = 0,
                 providers: Sequence[str] | None = None) -> ModelRuntime:
    if runtime == "onnxruntime":
        return OnnxModel(path, threads=threads, providers=providers)
    if runtime == "litert":
        return LiteRtModel(path, threads=threads)
    if runtime == "onnxruntime-genai":
        from edgeship.agent.llm.runtime import load_genai
        return load_genai(path, threads=threads, providers=providers)
    raise RuntimeLoadError(f"runtime {runtime!r} is not available on this agent",
                           reason_code=Reason.NO_COMPATIBLE_VARIANT)


def available_runtimes() -> tuple[str, ...]:
    """Runtimes this agent can load right now."""
    found = []
    if importlib.util.find_spec("onnxruntime") is not None:
        found.append("onnxruntime")
    if litert_backend() is not None:
        found.append("litert")
    if importlib.util.find_spec("onnxruntime_genai") is not None:
        found.append("onnxruntime-genai")
    return tuple(found)


def coerce_inputs(specs: Sequence[TensorSpec], raw: dict[str, object] | object,
                  *, max_batch: int = 1024, check_values: bool = True) -> dict[str, np.ndarray]:
    """Check a request against the model's input signature: names, rank, fixed dims, dtype
    and (``check_values``) that float inputs hold no NaN or infinity.

    ``raw`` is either a dict name → array-like, or (for single-input models) the array."""
    if not isinstance(raw, dict):
        if len(specs) != 1:
            raise InferenceInputError("model has several inputs: send an object by name")
        return {specs[0].name: _coerce_one(specs[0], raw, max_batch, check_values)}
    missing = [s.name for s in specs if s.name not in raw]
    extra = sorted(set(raw) - {s.name for s in specs})
    if missing or extra:
        raise InferenceInputError(f"inputs missing {missing} / unexpected {extra}")
    return {s.name: _coerce_one(s, raw[s.name], max_batch, check_values) for s in specs}


_DTYPE_CACHE: dict[str, np.dtype] = {}


def _dtype(name: str) -> np.dtype:
    dt = _DTYPE_CACHE.get(name)
    if dt is None:
        dt = _DTYPE_CACHE[name] = np.dtype(name)
    return dt


def _coerce_one(spec: TensorSpec, value: object, max_batch: int,
                check_values: bool = True) -> np.ndarray:
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
    if check_values and arr.dtype.kind == "f" and not np.isfinite(arr).all():
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
