"""Health check of a staged model: every golden sample in (every input), every output
compared with its golden values within its own tolerance, finite values, expected shapes,
and latency within the release's budget (see :mod:`agent.budget`).

``check_health`` is the pure check on a loaded runtime. ``check_in_subprocess`` runs it in
``agent.healthcheck_worker``, a child process with an address-space limit (RLIMIT_AS), a
CPU-time limit (RLIMIT_CPU) and a wall-clock timeout, so a model that segfaults, hangs or
eats all memory takes down only the child. Every failure maps to its own reason code.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgeship.agent.errors import HealthCheckError, Reason
from edgeship.agent.llm.spec import check_top_k
from edgeship.agent.manifest import Manifest, Variant
from edgeship.agent.runtime import ModelRuntime

if TYPE_CHECKING:
    from edgeship.agent.golden import Golden

# golden (zipfile), subprocess and signal are imported by the checks that use them: an idle
# agent imports this module for HealthLimits and never runs a check until an update arrives

logger = logging.getLogger(__name__)

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
    budget_source: str = "budget"

    @property
    def address_space_bytes(self) -> int:
        return (self.max_memory_mb + WORKER_BASE_MEMORY_MB) * 1024 * 1024

    @property
    def cpu_s(self) -> int:
        """CPU seconds: every thread busy for the whole timeout, plus start-up."""
        return int(self.timeout_s * max(1, self.threads)) + 5


def golden_for(manifest: Manifest, variant: Variant, golden_path: Path) -> Golden:
    """The feeds and expected outputs of ``variant``'s health check."""
    from edgeship.agent.golden import load_golden
    return load_golden(golden_path, variant.id, manifest.inputs,
                       [o.name for o in manifest.outputs])


def check_health(runtime: ModelRuntime, manifest: Manifest, variant: Variant,
                 golden_path: Path, *, latency_budget_ms: float | None = None,
                 budget_source: str = "budget") -> HealthReport:
    """Every golden sample through every input; every output against its golden values
    within its own tolerance; and the single-sample latency against the budget. The
    latency is measured right after the first golden sample (the warm-up), so a model far
    over its budget is refused for that after a few runs, not after every golden sample
    (on a slow board those would run into the health check's timeout instead)."""
    golden = golden_for(manifest, variant, golden_path)
    names = [o.name for o in manifest.outputs]
    try:
        got = [runtime.run(golden.feeds[0])]
        per_sample_ms = _median_latency_ms(runtime, golden.one_sample(),
                                           budget_ms=latency_budget_ms)
        if latency_budget_ms is not None and per_sample_ms > latency_budget_ms:
            raise HealthCheckError(f"{per_sample_ms:.1f} ms > {latency_budget_ms:.1f} ms "
                                   f"({budget_source})",
                                   reason_code=Reason.LATENCY_BUDGET_EXCEEDED)
        got += [runtime.run(feed) for feed in golden.feeds[1:]]
    except HealthCheckError:
        raise
    except Exception as e:  # any runtime failure is a failed health check
        oom = "alloc" in str(e).lower() or isinstance(e, MemoryError)
        raise HealthCheckError(f"model failed on golden inputs: {str(e)[:300]}",
                               reason_code=Reason.HEALTH_CHECK_OUT_OF_MEMORY if oom
                               else None) from e
    if any(len(outputs) != len(names) for outputs in got):
        raise HealthCheckError(f"model returns {len(got[0])} outputs, the manifest names "
                               f"{len(names)}", reason_code=Reason.OUTPUT_SHAPE_MISMATCH)
    from edgeship.agent.golden import compare as compare_golden
    checks = compare_golden(golden, got, {n: variant.tolerance(n) for n in names}, names)
    if manifest.llm is not None:  # language model: next-token top-k ids and their logits
        diff = check_top_k(got[0][0], golden.expected[names[0]][0],
                           manifest.llm.golden_top_k, variant.golden_atol)
        bad = [] if diff <= variant.golden_atol else \
            [replace(checks[0], max_abs_diff=diff, atol=variant.golden_atol)]
    else:
        diff = max((c.max_abs_diff for c in checks), default=0.0)
        bad = [c for c in checks if not c.ok]
    if bad:
        detail = "; ".join(f"{c.name} by {c.max_abs_diff:.3g} > atol {c.atol:.3g}"
                           for c in bad)
        raise HealthCheckError(f"golden outputs differ: {detail}", max_abs_diff=diff,
                               reason_code=Reason.GOLDEN_MISMATCH)
    return HealthReport(max_abs_diff=diff, latency_ms=per_sample_ms,
                        samples=sum(_rows(feed) for feed in golden.feeds))


def _rows(feed: dict[str, np.ndarray]) -> int:
    """Rows a feed checks: the leading dim of its first input with one (else 1)."""
    first = next((a for a in feed.values() if np.ndim(a)), None)
    return int(first.shape[0]) if first is not None else 1


def _median_latency_ms(runtime: ModelRuntime, feed: dict[str, np.ndarray],
                       runs: int = 7, budget_ms: float | None = None) -> float:
    """Median single-sample latency after the warm-up the golden samples already gave;
    stops as soon as most of the ``runs`` are over ``budget_ms`` (the verdict is known)."""
    times: list[float] = []
    for _ in range(runs):
        start = time.perf_counter()
        runtime.run(feed)
        times.append((time.perf_counter() - start) * 1000)
        if budget_ms is not None and sum(t > budget_ms for t in times) > runs // 2:
            break
    return float(np.median(times))


# --- the health check in a child process --------------------------------------------------

def check_in_subprocess(model_dir: Path, variant_id: str, limits: HealthLimits) -> HealthReport:
    """Run the health check of the installed version in ``model_dir`` in a limited child."""
    request = json.dumps({"dir": str(model_dir), "variant": variant_id,
                          "threads": limits.threads, "providers": list(limits.providers),
                          "latency_budget_ms": limits.latency_budget_ms,
                          "budget_source": limits.budget_source,
                          "address_space_bytes": limits.address_space_bytes,
                          "cpu_s": limits.cpu_s})
    import subprocess
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
        import signal
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
