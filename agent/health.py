"""Health check of a staged model: golden inputs in, golden outputs (within tolerance) out,
finite values, expected output shape, and latency within the device profile's budget."""

from __future__ import annotations

import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.errors import HealthCheckError, Reason
from agent.manifest import Manifest, Variant
from agent.runtime import ModelRuntime

MAX_GOLDEN_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class HealthReport:
    max_abs_diff: float
    latency_ms: float
    samples: int


def load_golden(path: Path, variant: Variant) -> tuple[np.ndarray, np.ndarray]:
    if path.stat().st_size > MAX_GOLDEN_BYTES:
        raise HealthCheckError(f"golden file {path.name} is too large")
    try:
        with np.load(path, allow_pickle=False) as data:
            return np.asarray(data["inputs"]), np.asarray(data[variant.id])
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as e:
        raise HealthCheckError(f"golden file unusable for {variant.id}: {e}",
                               reason_code=Reason.BUNDLE_INVALID) from e


def check_health(runtime: ModelRuntime, manifest: Manifest, variant: Variant,
                 golden_path: Path, *, latency_budget_ms: float | None = None) -> HealthReport:
    inputs, expected = load_golden(golden_path, variant)
    name = manifest.inputs[0].name
    feed = inputs.astype(manifest.inputs[0].dtype)
    try:
        got = np.asarray(runtime.run({name: feed})[0])
        per_sample_ms = _median_latency_ms(runtime, name, feed[:1])
    except Exception as e:  # any runtime failure is a failed health check
        raise HealthCheckError(f"model failed on golden inputs: {e}") from e
    if got.shape != expected.shape:
        raise HealthCheckError(f"output shape {list(got.shape)} != golden "
                               f"{list(expected.shape)}")
    if not np.all(np.isfinite(got)):
        raise HealthCheckError("model produced NaN or infinite outputs")
    diff = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64))))
    if diff > variant.golden_atol:
        raise HealthCheckError(f"golden outputs differ by {diff:.3g} > atol "
                               f"{variant.golden_atol:.3g}", max_abs_diff=diff)
    if latency_budget_ms is not None and per_sample_ms > latency_budget_ms:
        raise HealthCheckError(f"median latency {per_sample_ms:.2f} ms exceeds the "
                               f"budget of {latency_budget_ms:.2f} ms", max_abs_diff=diff)
    return HealthReport(max_abs_diff=diff, latency_ms=per_sample_ms, samples=len(inputs))


def _median_latency_ms(runtime: ModelRuntime, name: str, one: np.ndarray,
                       runs: int = 7) -> float:
    """Median single-sample latency after the warm-up the golden batch already gave."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        runtime.run({name: one})
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))
