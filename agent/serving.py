"""Serving: the active model per name, hot-swapped by reference, and per-model stats.

A swap replaces one dict entry under a short lock; a request that already holds the old
model finishes on it. The network is never on this path.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.errors import EdgeshipError, InferenceInputError, Reason
from agent.runtime import ModelRuntime, coerce_inputs
from agent.store import InstalledModel

MAX_LATENCY_SAMPLES = 10_000
LATENCY_BUCKETS_MS = (0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)


class ModelNotFoundError(EdgeshipError):
    reason_code = Reason.NOT_FOUND


@dataclass(frozen=True)
class LoadedModel:
    installed: InstalledModel
    runtime: ModelRuntime

    def describe(self) -> dict[str, Any]:
        m = self.installed.manifest
        return {"model": m.model, "version": m.version, "variant": self.installed.variant.id,
                "precision": self.installed.variant.precision,
                "runtime": self.installed.variant.runtime,
                "inputs": [t.to_dict() for t in m.inputs],
                "outputs": [t.to_dict() for t in m.outputs],
                "labels": list(m.labels)}


class ModelStats:
    """Counts and latencies since the last snapshot (bounded, oldest dropped)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reset()
        self.total_requests = 0
        self.total_errors = 0
        self.total_model_errors = 0  # runtime failures only; the update trial reads it
        self.total_samples = 0
        # cumulative latency histogram (Prometheus): counts per LATENCY_BUCKETS_MS bound
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self.latency_sum_ms = 0.0

    def _reset(self) -> None:
        self.requests = 0
        self.errors = 0
        self.samples = 0
        self.latencies_ms: deque[float] = deque(maxlen=MAX_LATENCY_SAMPLES)
        self.since = time.time()

    def record(self, latency_ms: float | None, samples: int = 1,
               client_error: bool = False) -> None:
        with self._lock:
            self.requests += 1
            self.total_requests += 1
            self.samples += samples
            self.total_samples += samples
            if latency_ms is None:
                self.errors += 1
                self.total_errors += 1
                if not client_error:  # a bad request is not the model's failure
                    self.total_model_errors += 1
            else:
                self.latencies_ms.append(latency_ms)
                self.latency_buckets[bisect.bisect_left(LATENCY_BUCKETS_MS, latency_ms)] += 1
                self.latency_sum_ms += latency_ms

    def totals(self) -> dict[str, int]:
        """Cumulative counts since start (never reset; for Prometheus counters)."""
        with self._lock:
            return {"requests": self.total_requests, "errors": self.total_errors,
                    "samples": self.total_samples}

    def histogram(self) -> tuple[list[int], float]:
        """Cumulative (never reset) latency bucket counts and their sum in ms."""
        with self._lock:
            return list(self.latency_buckets), self.latency_sum_ms

    def snapshot(self, reset: bool = True) -> dict[str, Any]:
        with self._lock:
            lat = np.asarray(self.latencies_ms, dtype=np.float64)
            elapsed = max(1e-9, time.time() - self.since)
            snap = {"requests": self.requests, "errors": self.errors,
                    "samples": self.samples, "input_rate_per_s": self.samples / elapsed,
                    "latency_ms": _percentiles(lat)}
            if reset:
                self._reset()
            return snap


def _percentiles(lat: np.ndarray) -> dict[str, float | None]:
    if lat.size == 0:
        return {"p50": None, "p95": None, "p99": None, "count": 0}
    p50, p95, p99 = np.percentile(lat, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "count": int(lat.size)}


class ModelServer:
    def __init__(self) -> None:
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()
        self.stats: dict[str, ModelStats] = {}
        self.shadows: dict[str, Any] = {}  # name -> agent.shadow.ShadowRun (issue 4)

    def swap(self, loaded: LoadedModel) -> LoadedModel | None:
        name = loaded.installed.model
        with self._lock:
            old = self._models.get(name)
            self._models[name] = loaded
            stats = self.stats.setdefault(name, ModelStats())
        if old is not None and old.installed.version != loaded.installed.version:
            # Telemetry labels a window with the version being served when it is sent: start a
            # fresh window so the old version's latencies are never reported as the new one's
            # (rollout gates compare the two). Cumulative totals are kept.
            stats.snapshot(reset=True)
        return old

    def find(self, name: str) -> LoadedModel | None:
        return self._models.get(name)

    def remove(self, name: str) -> LoadedModel | None:
        with self._lock:
            return self._models.pop(name, None)

    def stats_for(self, name: str) -> ModelStats:
        with self._lock:
            return self.stats.setdefault(name, ModelStats())

    def get(self, name: str) -> LoadedModel:
        loaded = self._models.get(name)
        if loaded is None:
            raise ModelNotFoundError(f"no model named {name!r} is being served")
        return loaded

    def models(self) -> list[LoadedModel]:
        with self._lock:
            return list(self._models.values())

    def predict(self, name: str, raw_inputs: Any) -> tuple[list[np.ndarray], LoadedModel]:
        loaded = self.get(name)
        stats = self.stats[name]
        manifest = loaded.installed.manifest
        try:
            inputs = coerce_inputs(manifest.inputs, raw_inputs)
        except InferenceInputError:
            stats.record(None, client_error=True)
            raise
        batch = int(next(iter(inputs.values())).shape[0]) if inputs else 1
        start = time.perf_counter()
        try:
            outputs = loaded.runtime.run(inputs)
        except Exception as e:
            stats.record(None, batch)
            raise EdgeshipError(f"inference failed: {e}") from e
        stats.record((time.perf_counter() - start) * 1000, batch)
        shadow = self.shadows.get(name)
        if shadow is not None:
            shadow.offer(inputs, outputs)
        return outputs, loaded
