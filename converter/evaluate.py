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

from converter.errors import EvaluationError
from converter.export import INPUT_NAME

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


def run_batched(session, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Run ``session`` over ``x`` in batches; returns the first output, concatenated."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    outs = [session.run(None, {INPUT_NAME: x[i:i + batch_size]})[0]
            for i in range(0, len(x), batch_size)]
    return np.concatenate(outs, axis=0)


def measure_latency(session, sample: np.ndarray, warmup_runs: int,
                    timed_runs: int) -> tuple[float, float]:
    """Single-sample latency: ``warmup_runs`` untimed, then (p50, p99) ms of the rest."""
    feed = {INPUT_NAME: np.ascontiguousarray(sample[:1], dtype=np.float32)}
    for _ in range(warmup_runs):
        session.run(None, feed)
    durations = []
    for _ in range(max(timed_runs, 1)):
        start = time.perf_counter()
        session.run(None, feed)
        durations.append(time.perf_counter() - start)
    return latency_percentiles(durations)


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
    if labels is not None:
        accuracy = top1_accuracy(outputs, labels)
        ref_acc = (reference_accuracy if reference_accuracy is not None
                   else top1_accuracy(reference_outputs, labels))
    else:
        accuracy, ref_acc = cmp.agreement, 1.0
    p50, p99 = measure_latency(session, x, settings.warmup_runs, settings.timed_runs)
    metrics = VariantMetrics(
        accuracy=accuracy, accuracy_drop=(ref_acc - accuracy) * 100.0,
        agreement=cmp.agreement, cosine=cmp.cosine, max_abs_diff=cmp.max_abs_diff,
        latency_p50_ms=p50, latency_p99_ms=p99, size_bytes=Path(path).stat().st_size,
        samples=len(x))
    logger.info("%s: accuracy %.4f drop %.2f pt agreement %.4f p50 %.3f ms", path,
                accuracy, metrics.accuracy_drop, cmp.agreement, p50)
    return metrics, outputs

