"""Health check of a staged model: golden inputs in, golden outputs (within tolerance) out,
finite values, expected output shape, and latency within the device profile's budget.

``check_health`` is the pure check on a loaded runtime. ``check_in_subprocess`` runs it in
``agent.healthcheck_worker``, a child process with an address-space limit (RLIMIT_AS), a
CPU-time limit (RLIMIT_CPU) and a wall-clock timeout, so a model that segfaults, hangs or
eats all memory takes down only the child. Every failure maps to its own reason code.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeship.agent.errors import HealthCheckError, Reason
from edgeship.agent.llm.spec import check_top_k
from edgeship.agent.manifest import Manifest, Variant
from edgeship.agent.runtime import ModelRuntime

logger = logging.getLogger(__name__)

MAX_GOLDEN_BYTES = 64 * 1024 * 1024
MAX_WORKER_OUTPUT_BYTES = 64 * 1024
#: Address space the worker needs beyond the model (Python, numpy, onnxruntime, arenas).
WORKER_BASE_MEMORY_MB = 2048


@dataclass(frozen=True)
class HealthReport:
    max_abs_diff: float
    latency_ms: float
    samples: int


@dataclass(frozen=True)
class HealthLimits:
    """Limits of the health-check child process."""

    timeout_s: float = 60.0
    max_memory_mb: int = 1024  # for the model; WORKER_BASE_MEMORY_MB is added
    threads: int = 0
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    latency_budget_ms: float | None = None

    @property
    def address_space_bytes(self) -> int:
        return (self.max_memory_mb + WORKER_BASE_MEMORY_MB) * 1024 * 1024

    @property
    def cpu_s(self) -> int:
        """CPU seconds: every thread busy for the whole timeout, plus start-up."""
        return int(self.timeout_s * max(1, self.threads)) + 5


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
        oom = "alloc" in str(e).lower() or isinstance(e, MemoryError)
        raise HealthCheckError(f"model failed on golden inputs: {str(e)[:300]}",
                               reason_code=Reason.HEALTH_CHECK_OUT_OF_MEMORY if oom
                               else None) from e
    if got.shape != expected.shape:
        raise HealthCheckError(f"output shape {list(got.shape)} != golden "
                               f"{list(expected.shape)}",
                               reason_code=Reason.OUTPUT_SHAPE_MISMATCH)
    if not np.all(np.isfinite(got)):
        raise HealthCheckError("model produced NaN or infinite outputs",
                               reason_code=Reason.NONFINITE_OUTPUT)
    if manifest.llm is not None:  # language model: next-token top-k ids and their logits
        diff = check_top_k(got, expected, manifest.llm.golden_top_k, variant.golden_atol)
    else:
        diff = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64))))
    if diff > variant.golden_atol:
        raise HealthCheckError(f"golden outputs differ by {diff:.3g} > atol "
                               f"{variant.golden_atol:.3g}", max_abs_diff=diff,
                               reason_code=Reason.GOLDEN_MISMATCH)
    if latency_budget_ms is not None and per_sample_ms > latency_budget_ms:
        raise HealthCheckError(f"median latency {per_sample_ms:.2f} ms exceeds the "
                               f"budget of {latency_budget_ms:.2f} ms", max_abs_diff=diff,
                               reason_code=Reason.LATENCY_BUDGET_EXCEEDED)
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


# --- the health check in a child process --------------------------------------------------

def check_in_subprocess(model_dir: Path, variant_id: str, limits: HealthLimits) -> HealthReport:
    """Run the health check of the installed version in ``model_dir`` in a limited child."""
    request = json.dumps({"dir": str(model_dir), "variant": variant_id,
                          "threads": limits.threads, "providers": list(limits.providers),
                          "latency_budget_ms": limits.latency_budget_ms,
                          "address_space_bytes": limits.address_space_bytes,
                          "cpu_s": limits.cpu_s})
    cmd = [sys.executable, "-m", "edgeship.agent.healthcheck_worker", request]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=limits.timeout_s,
                              start_new_session=True, env=_worker_env())
    except subprocess.TimeoutExpired as e:
        raise HealthCheckError(f"health check did not finish in {limits.timeout_s:g} s "
                               "(model hangs or is far too slow)",
                               reason_code=Reason.HEALTH_CHECK_TIMEOUT) from e
    logger.debug("health worker finished in %.2f s, rc=%s", time.monotonic() - start,
                 proc.returncode)
    return _interpret(proc.returncode, proc.stdout[-MAX_WORKER_OUTPUT_BYTES:],
                      proc.stderr[-2000:])


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                else "")
    return env


def _interpret(rc: int, stdout: bytes, stderr: bytes) -> HealthReport:
    if rc < 0:
        sig = signal.Signals(-rc)
        if sig in (signal.SIGXCPU, signal.SIGKILL):
            raise HealthCheckError(f"health check exceeded its CPU limit ({sig.name})",
                                   reason_code=Reason.HEALTH_CHECK_TIMEOUT)
        raise HealthCheckError(f"model crashed the health-check process ({sig.name})",
                               reason_code=Reason.HEALTH_CHECK_CRASHED)
    try:
        doc = json.loads(stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError, UnicodeDecodeError):
        tail = stderr.decode(errors="replace").strip()[-300:]
        if "MemoryError" in tail or "bad_alloc" in tail or "std::bad_alloc" in tail:
            raise HealthCheckError(f"health check ran out of memory: {tail}",
                                   reason_code=Reason.HEALTH_CHECK_OUT_OF_MEMORY) from None
        raise HealthCheckError(f"health-check process exited {rc} without a result: "
                               f"{tail}", reason_code=Reason.HEALTH_CHECK_CRASHED) from None
    if not doc.get("ok"):
        raise HealthCheckError(str(doc.get("message", "health check failed"))[:500],
                               reason_code=Reason(doc.get("reason",
                                                          Reason.HEALTH_CHECK_FAILED.value)),
                               max_abs_diff=doc.get("max_abs_diff"))
    return HealthReport(max_abs_diff=float(doc["max_abs_diff"]),
                        latency_ms=float(doc["latency_ms"]), samples=int(doc["samples"]))
