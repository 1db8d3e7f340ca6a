"""Measure one variant (ONNX or .tflite) against the source model's outputs.

Runners (:class:`OnnxRunner`, :class:`TFLiteRunner`) take a feed ``{input name: array}``
and return every output in the model's order; :func:`evaluate` runs a variant over the
samples, compares every output (:mod:`converter.metrics`), times single-sample latency and
records size and memory.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from edgeship.agent.runtime import tensor_affine, dequantize, ordered_outputs, quantize
from edgeship.converter.errors import EvaluationError
from edgeship.converter.metrics import OutputMetrics, attention_masks, compare, top1_accuracy
from edgeship.converter.samples import Outputs, Samples, TensorInfo, first_line, run_samples

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSettings:
    threads: int = 2
    warmup_runs: int = 20
    timed_runs: int = 200
    max_timing_s: float = 4.0  # slow models: fewer runs (at least MIN_TIMED_RUNS)


@dataclass(frozen=True)
class VariantMetrics:
    outputs: tuple[OutputMetrics, ...]
    latency_p50_ms: float
    latency_p99_ms: float
    size_bytes: int
    samples: int
    task: str = "generic"
    accuracy: float | None = None  # top-1 against labels (classification with labels)
    reference_accuracy: float | None = None
    memory_bytes: int = 0  # resident-memory growth from loading the model and running it

    @property
    def accuracy_drop(self) -> float | None:
        """Points below the source model's accuracy (only with labels)."""
        if self.accuracy is None or self.reference_accuracy is None:
            return None
        return (self.reference_accuracy - self.accuracy) * 100.0

    @property
    def agreement(self) -> float | None:
        values = [o.agreement for o in self.outputs if o.agreement is not None]
        return min(values) if values else None

    @property
    def cosine(self) -> float:
        values = [o.cosine for o in self.outputs if not o.exact]
        return min(values) if values else 1.0

    @property
    def max_abs_diff(self) -> float:
        return max((o.max_abs_diff for o in self.outputs), default=0.0)

    @property
    def snr_db(self) -> float:
        values = [o.snr_db for o in self.outputs if not o.exact]
        return min(values) if values else 0.0

    def to_dict(self) -> dict[str, float]:
        """The manifest ``metrics`` dict of a variant (floats only; absent = not measured)."""
        d = {"cosine": round(self.cosine, 6), "max_abs_diff": round(self.max_abs_diff, 6),
             "snr_db": round(self.snr_db, 3),
             "latency_p50_ms": round(self.latency_p50_ms, 4),
             "latency_p99_ms": round(self.latency_p99_ms, 4),
             "size_bytes": float(self.size_bytes), "samples": float(self.samples),
             "memory_bytes": float(self.memory_bytes)}
        for key in ("accuracy", "accuracy_drop", "agreement"):
            value = getattr(self, key)
            if value is not None:
                d[key] = round(float(value), 6)
        return d


def latency_percentiles(durations_s: Sequence[float]) -> tuple[float, float]:
    """(p50, p99) in milliseconds."""
    ms = np.asarray(durations_s, dtype=np.float64) * 1000.0
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


# --- runners ------------------------------------------------------------------------------

def open_session(path: str | os.PathLike, threads: int = 2):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise EvaluationError(f"onnxruntime cannot load it: {first_line(e)}") from e


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16",
              "tensor(double)": "float64", "tensor(int64)": "int64", "tensor(int32)": "int32",
              "tensor(int16)": "int16", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
              "tensor(uint16)": "uint16", "tensor(bool)": "bool"}


class OnnxRunner:
    """An onnxruntime session: ``run(feed)`` → every output, in the model's order."""

    def __init__(self, path: str | os.PathLike, threads: int = 2) -> None:
        self.session = open_session(path, threads)
        self.inputs = tuple(TensorInfo(i.name, _ORT_TYPES.get(i.type, "unsupported"),
                                       tuple(d if isinstance(d, int) and d > 0 else None
                                             for d in i.shape))
                            for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, dict(feed))


class TFLiteRunner:
    """A LiteRT interpreter with every input and output. Inputs are matched by name, else
    by position; outputs come in the signature's order (``output_0``, ``output_1``, ...)
    where the model has one signature. Full-integer models get their inputs quantized and
    outputs dequantized with the tensors' own parameters."""

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
            raise EvaluationError(f"{Path(path).name}: LiteRT cannot load the model: "
                                  f"{first_line(e)}") from e
        self._in = list(self._it.get_input_details())
        self._out = ordered_outputs(self._it)
        self.inputs = tuple(TensorInfo(d["name"], np.dtype(d["dtype"]).name,
                                       _signature_shape(d)) for d in self._in)
        self.output_names = tuple(d["name"] for d in self._out)

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        arrays = list(feed.values())
        if len(arrays) != len(self._in):
            raise EvaluationError(f"model takes {len(self._in)} inputs, got {len(arrays)}")
        if all(d["name"] in feed for d in self._in):
            arrays = [feed[d["name"]] for d in self._in]
        resized = False
        for d, a in zip(self._in, arrays):
            if tuple(d["shape"]) != a.shape:
                self._it.resize_tensor_input(d["index"], list(a.shape))
                resized = True
        if resized:
            self._it.allocate_tensors()
            self._in = list(self._it.get_input_details())
        for d, a in zip(self._in, arrays):
            self._it.set_tensor(d["index"], quantize(a, tensor_affine(d)).astype(
                np.dtype(d["dtype"]), copy=False))
        self._it.invoke()
        return [dequantize(np.array(self._it.get_tensor(d["index"])), tensor_affine(d))
                for d in self._out]


def _signature_shape(d: dict) -> tuple[int | None, ...]:
    sig = d.get("shape_signature", d["shape"])
    return tuple(None if int(s) < 0 else int(s) for s in sig)


def open_runner(path: str | os.PathLike, threads: int = 2):
    return TFLiteRunner(path, threads) if Path(path).suffix == ".tflite" else \
        OnnxRunner(path, threads)


# --- measuring ----------------------------------------------------------------------------

MIN_TIMED_RUNS = 10


def measure_latency(runner, feed: Mapping[str, np.ndarray], warmup_runs: int,
                    timed_runs: int, max_s: float = 4.0) -> tuple[float, float]:
    """Single-sample latency: ``warmup_runs`` untimed, then (p50, p99) ms of up to
    ``timed_runs`` runs; a slow model stops after ``max_s`` (and MIN_TIMED_RUNS runs)."""
    deadline = time.perf_counter() + max_s / 4
    for _ in range(warmup_runs):
        runner.run(feed)
        if time.perf_counter() > deadline:
            break
    durations: list[float] = []
    deadline = time.perf_counter() + max_s
    while len(durations) < max(timed_runs, 1):
        start = time.perf_counter()
        runner.run(feed)
        durations.append(time.perf_counter() - start)
        if start > deadline and len(durations) >= min(MIN_TIMED_RUNS, timed_runs):
            break
    return latency_percentiles(durations)


def rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc``; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def run_model(path: str | os.PathLike, samples: Samples, names: Sequence[str],
              threads: int = 2) -> Outputs:
    """Outputs of the model at ``path`` on every sample, named after the source's."""
    runner = open_runner(path, threads)
    return run_samples(runner.run, samples, names, Path(path).name)


@dataclass(frozen=True)
class Reference:
    """What every variant is held to: the source's outputs on the validation samples."""

    outputs: Outputs
    task: str
    accuracy: float | None = None  # the source's top-1 with labels


def evaluate(path: str | os.PathLike, samples: Samples, reference: Reference,
             settings: EvalSettings = EvalSettings(), *,
             timed: bool = True) -> tuple[VariantMetrics, Outputs]:
    """Measure the model at ``path`` on ``samples`` against ``reference``."""
    before = rss_bytes()
    runner = open_runner(path, settings.threads)
    outputs = run_samples(runner.run, samples.take(len(reference.outputs)),
                          reference.outputs.names, Path(path).name)
    per_output = compare(outputs, reference.outputs, reference.task,
                         attention_masks(samples.take(len(outputs)).feeds()))
    accuracy = None
    if samples.y is not None and reference.accuracy is not None:
        accuracy = top1_accuracy(outputs, samples.y)
    p50 = p99 = 0.0
    if timed:
        p50, p99 = measure_latency(runner, samples.feed(0), settings.warmup_runs,
                                   settings.timed_runs, settings.max_timing_s)
    metrics = VariantMetrics(per_output, p50, p99, Path(path).stat().st_size, len(outputs),
                             reference.task, accuracy, reference.accuracy,
                             max(0, rss_bytes() - before))
    logger.info("%s: cosine %.5f agreement %s p50 %.3f ms", Path(path).name, metrics.cosine,
                metrics.agreement, p50)
    return metrics, outputs


def make_reference(path: str | os.PathLike, samples: Samples, task: str,
                   threads: int = 2) -> Reference:
    """The source model's outputs (and top-1 accuracy with labels for classifiers)."""
    runner = open_runner(path, threads)
    outputs = run_samples(runner.run, samples, runner.output_names, "the source model")
    return reference_from(outputs, samples, task)


def reference_from(outputs: Outputs, samples: Samples, task: str) -> Reference:
    accuracy = None
    if samples.y is not None and task in ("classification", "sequence"):
        accuracy = top1_accuracy(outputs, samples.y)  # per sample, or per step
    return Reference(outputs, task, accuracy)


def quick(settings: EvalSettings) -> EvalSettings:
    """No latency runs: for gate checks inside a search."""
    return replace(settings, warmup_runs=0, timed_runs=1)
