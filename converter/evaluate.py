"""Measure one ONNX variant with onnxruntime against reference outputs.

Pure metric functions (:func:`compare_outputs`, :func:`latency_percentiles`) are kept apart
from the parts that load sessions and time them.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeship.converter.errors import EvaluationError
from edgeship.converter.export import INPUT_NAME

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSettings:
    threads: int = 2
    warmup_runs: int = 20
    timed_runs: int = 200
    batch_size: int = 256  # for the accuracy pass; latency is always single-sample


@dataclass(frozen=True)
class OutputComparison:
    agreement: float  # fraction of samples whose top-1 matches the reference's top-1
    cosine: float  # mean per-sample cosine similarity of the output vectors
    max_abs_diff: float


@dataclass(frozen=True)
class VariantMetrics:
    accuracy: float  # fraction 0..1 (labels) or agreement when no labels were given
    accuracy_drop: float  # percentage points below the reference accuracy
    agreement: float
    cosine: float
    max_abs_diff: float
    latency_p50_ms: float
    latency_p99_ms: float
    size_bytes: int
    samples: int
    memory_bytes: int = 0  # resident-memory growth from loading the model and running it

    def to_dict(self) -> dict[str, float]:
        """The manifest ``metrics`` dict of a variant (floats only)."""
        return {
            "accuracy": round(self.accuracy, 6),
            "accuracy_drop": round(self.accuracy_drop, 4),
            "agreement": round(self.agreement, 6),
            "cosine": round(self.cosine, 6),
            "max_abs_diff": round(self.max_abs_diff, 6),
            "latency_p50_ms": round(self.latency_p50_ms, 4),
            "latency_p99_ms": round(self.latency_p99_ms, 4),
            "size_bytes": float(self.size_bytes),
            "samples": float(self.samples),
            "memory_bytes": float(self.memory_bytes),
        }


# --- pure metrics ------------------------------------------------------------------------

def top1_accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    if len(outputs) != len(labels):
        raise EvaluationError(f"{len(outputs)} outputs but {len(labels)} labels")
    return float((np.argmax(outputs, axis=1) == labels).mean())


def compare_outputs(outputs: np.ndarray, reference: np.ndarray) -> OutputComparison:
    """Top-1 agreement, mean cosine similarity and max |diff| of two N×C output arrays."""
    if outputs.shape != reference.shape:
        raise EvaluationError(f"output shape {outputs.shape} differs from reference "
                              f"{reference.shape}")
    a = outputs.reshape(len(outputs), -1).astype(np.float64)
    b = reference.reshape(len(reference), -1).astype(np.float64)
    agreement = float((a.argmax(axis=1) == b.argmax(axis=1)).mean())
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(norms > 0, (a * b).sum(axis=1) / np.maximum(norms, 1e-30), 1.0)
    return OutputComparison(agreement=agreement, cosine=float(cos.mean()),
                            max_abs_diff=float(np.abs(a - b).max()))


def latency_percentiles(durations_s: list[float]) -> tuple[float, float]:
    """(p50, p99) in milliseconds."""
    ms = np.asarray(durations_s, dtype=np.float64) * 1000.0
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


# --- onnxruntime -------------------------------------------------------------------------

def open_session(path: str | os.PathLike, threads: int = 2):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise EvaluationError(f"{path}: onnxruntime cannot load the model: {e}") from e


def session_input_name(session) -> str:
    inputs = session.get_inputs()
    return inputs[0].name if inputs else INPUT_NAME


def run_batched(session, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Run ``session`` over ``x`` in batches; returns the first output, concatenated."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    name = session_input_name(session)
    outs = [session.run(None, {name: x[i:i + batch_size]})[0]
            for i in range(0, len(x), batch_size)]
    return np.concatenate(outs, axis=0)


def measure_latency(session, sample: np.ndarray, warmup_runs: int,
                    timed_runs: int) -> tuple[float, float]:
    """Single-sample latency: ``warmup_runs`` untimed, then (p50, p99) ms of the rest."""
    feed = {session_input_name(session): np.ascontiguousarray(sample[:1], dtype=np.float32)}
    for _ in range(warmup_runs):
        session.run(None, feed)
    durations = []
    for _ in range(max(timed_runs, 1)):
        start = time.perf_counter()
        session.run(None, feed)
        durations.append(time.perf_counter() - start)
    return latency_percentiles(durations)



def _accuracy_pair(outputs: np.ndarray, reference_outputs: np.ndarray,
                   labels: np.ndarray | None, reference_accuracy: float | None,
                   cmp: OutputComparison) -> tuple[float, float]:
    """(variant accuracy, reference accuracy); without labels, agreement vs 1.0."""
    if labels is None:
        return cmp.agreement, 1.0
    ref_acc = (reference_accuracy if reference_accuracy is not None
               else top1_accuracy(reference_outputs, labels))
    return top1_accuracy(outputs, labels), ref_acc

def evaluate_variant(path: str | os.PathLike, x: np.ndarray, reference_outputs: np.ndarray,
                     labels: np.ndarray | None = None,
                     reference_accuracy: float | None = None,
                     settings: EvalSettings = EvalSettings()) -> tuple[VariantMetrics,
                                                                       np.ndarray]:
    """Measure the model at ``path`` on ``x``; returns its metrics and its outputs.

    With ``labels``, accuracy is top-1 accuracy and the drop is measured against
    ``reference_accuracy`` (the reference outputs' accuracy if not given). Without labels,
    accuracy is top-1 agreement with the reference, whose own "accuracy" is 1.0.
    """
    if len(x) != len(reference_outputs):
        raise EvaluationError(f"{len(x)} inputs but {len(reference_outputs)} reference "
                              "outputs")
    session = open_session(path, settings.threads)
    outputs = run_batched(session, x, settings.batch_size)
    cmp = compare_outputs(outputs, reference_outputs)
    accuracy, ref_acc = _accuracy_pair(outputs, reference_outputs, labels,
                                       reference_accuracy, cmp)
    p50, p99 = measure_latency(session, x, settings.warmup_runs, settings.timed_runs)
    metrics = VariantMetrics(
        accuracy=accuracy, accuracy_drop=(ref_acc - accuracy) * 100.0,
        agreement=cmp.agreement, cosine=cmp.cosine, max_abs_diff=cmp.max_abs_diff,
        latency_p50_ms=p50, latency_p99_ms=p99, size_bytes=Path(path).stat().st_size,
        samples=len(x))
    logger.info("%s: accuracy %.4f drop %.2f pt agreement %.4f p50 %.3f ms", path,
                accuracy, metrics.accuracy_drop, cmp.agreement, p50)
    return metrics, outputs



# --- any runtime ---------------------------------------------------------------------------

def rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc``; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class TFLiteRunner:
    """Runs a .tflite file with ``ai_edge_litert`` one sample at a time (static batch 1)."""

    def __init__(self, path: str | os.PathLike, threads: int = 2) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as e:
            raise EvaluationError("evaluating .tflite needs ai-edge-litert "
                                  "(pip install 'edgeship[tflite]')") from e
        try:
            self._it = Interpreter(model_path=str(path), num_threads=threads)
            self._it.allocate_tensors()
        except Exception as e:  # noqa: BLE001
            raise EvaluationError(f"{path}: LiteRT cannot load the model: {e}") from e
        self._in = self._it.get_input_details()[0]
        self._out = self._it.get_output_details()[0]

    def _quant(self, x: np.ndarray) -> np.ndarray:
        scale, zero = self._in.get("quantization", (0.0, 0))
        if self._in["dtype"] in (np.int8, np.uint8) and scale:
            info = np.iinfo(self._in["dtype"])
            return np.clip(np.round(x / scale + zero), info.min, info.max).astype(
                self._in["dtype"])
        return x.astype(self._in["dtype"])

    def _dequant(self, y: np.ndarray) -> np.ndarray:
        scale, zero = self._out.get("quantization", (0.0, 0))
        if self._out["dtype"] in (np.int8, np.uint8) and scale:
            return (y.astype(np.float32) - zero) * scale
        return y.astype(np.float32)

    def run_one(self, x: np.ndarray) -> np.ndarray:
        self._it.set_tensor(self._in["index"], self._quant(x[:1]))
        self._it.invoke()
        return self._dequant(self._it.get_tensor(self._out["index"]))

    def run_all(self, x: np.ndarray) -> np.ndarray:
        return np.concatenate([self.run_one(x[i:i + 1]) for i in range(len(x))], axis=0)


def _tflite_latency(runner: TFLiteRunner, sample: np.ndarray, warmup_runs: int,
                    timed_runs: int) -> tuple[float, float]:
    for _ in range(warmup_runs):
        runner.run_one(sample[:1])
    durations = []
    for _ in range(max(timed_runs, 1)):
        start = time.perf_counter()
        runner.run_one(sample[:1])
        durations.append(time.perf_counter() - start)
    return latency_percentiles(durations)


def evaluate_any(path: str | os.PathLike, x: np.ndarray, reference_outputs: np.ndarray,
                 labels: np.ndarray | None = None, reference_accuracy: float | None = None,
                 settings: EvalSettings = EvalSettings()) -> tuple[VariantMetrics,
                                                                   np.ndarray]:
    """:func:`evaluate_variant` for ONNX or .tflite, plus resident-memory growth."""
    before = rss_bytes()
    if Path(path).suffix != ".tflite":
        metrics, outputs = evaluate_variant(path, x, reference_outputs, labels,
                                            reference_accuracy, settings)
    else:
        runner = TFLiteRunner(path, settings.threads)
        outputs = runner.run_all(np.ascontiguousarray(x, dtype=np.float32))
        cmp = compare_outputs(outputs.reshape(reference_outputs.shape), reference_outputs)
        accuracy, ref_acc = _accuracy_pair(outputs, reference_outputs, labels,
                                           reference_accuracy, cmp)
        p50, p99 = _tflite_latency(runner, x, settings.warmup_runs, settings.timed_runs)
        metrics = VariantMetrics(accuracy, (ref_acc - accuracy) * 100.0, cmp.agreement,
                                 cmp.cosine, cmp.max_abs_diff, p50, p99,
                                 Path(path).stat().st_size, len(x))
    from dataclasses import replace

    return replace(metrics, memory_bytes=max(0, rss_bytes() - before)), outputs
