"""Serving: the active model per name, hot-swapped by reference, and per-model stats.

A swap replaces one dict entry under a short lock; a request that already holds the old
model finishes on it. The network is never on this path.

The request path is kept to a few attribute compares: everything a request needs (the bound
run method, the input name, dtype and fixed dims) is resolved once per swap into a
``_Serving`` entry, latencies go into a preallocated ring of ``perf_counter_ns`` deltas plus a
fixed bucket counter, and the percentile maths runs on the telemetry/metrics thread.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from time import perf_counter_ns
from typing import Any, Callable

import numpy as np

from edgeship.agent.errors import EdgeshipError, InferenceInputError, Reason
from edgeship.agent.runtime import ModelRuntime, coerce_inputs
from edgeship.agent.store import InstalledModel
from edgeship.agent.llm.stats import FRONTEND_ATTR

#: latencies kept for the window's percentiles (a ring: the newest this many are used)
LATENCY_RING_SIZE = 8192
_RING_MASK = LATENCY_RING_SIZE - 1
LATENCY_BUCKETS_MS = (0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)
_BUCKET_BOUNDS_NS = np.array([round(ms * 1_000_000) for ms in LATENCY_BUCKETS_MS],
                             dtype=np.int64)
MAX_BATCH = 1024
_isfinite = np.isfinite
_SMALL_SCAN = 32768  # elements


def all_finite(x: np.ndarray) -> bool:
    """True when ``x`` holds no NaN or infinity: a byte search for a small array (less
    call overhead), one reduction for a large one (no copy of the mask)."""
    if x.size <= _SMALL_SCAN:
        return b"\0" not in _isfinite(x).tobytes()
    return bool(_isfinite(x).all())


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
    """Cumulative counters, a cumulative latency histogram and the current telemetry window.

    The request path (``record_ns``) stores one int in a preallocated ring and bumps two
    counters under an uncontended lock. The histogram is brought up to date from the ring in
    vectorised batches (when read, or before a slot not yet counted is overwritten), and
    ``snapshot`` turns the window into percentiles."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ring = [0] * LATENCY_RING_SIZE  # latency ns of successful requests
        self._ok = 0  # successful requests ever; also the ring's write position
        self._errors = 0
        self._model_errors = 0  # runtime failures only; the update trial reads it
        self._samples = 0
        # cumulative histogram of the ring entries before ``_folded`` (updated in batches)
        self._folded = 0
        self._buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)  # per bucket, last one +Inf
        self._sum_ns = 0
        self._window = (0, 0, 0, time.time())  # ok, errors, samples at its start; since

    def record_ns(self, latency_ns: int, samples: int) -> None:
        """One successful request (the hot path): a ring slot and two counters."""
        with self._lock:
            n = self._ok
            if n - self._folded == LATENCY_RING_SIZE:
                self._fold()  # the slot about to be overwritten is not in the histogram yet
            self._ring[n & _RING_MASK] = latency_ns
            self._ok = n + 1
            self._samples += samples

    def _fold(self) -> None:
        """Adds the ring's latencies not yet counted to the cumulative histogram and sum
        (vectorised; caller holds the lock)."""
        lat = np.asarray(self._ring_tail(self._ok - self._folded), dtype=np.int64)
        self._folded = self._ok
        if lat.size:
            where = np.searchsorted(_BUCKET_BOUNDS_NS, lat, side="left")
            counts = np.bincount(where, minlength=len(self._buckets))
            self._buckets = [a + int(b) for a, b in zip(self._buckets, counts)]
            self._sum_ns += int(lat.sum())

    def record_error(self, samples: int = 1, client_error: bool = False) -> None:
        with self._lock:
            self._errors += 1
            self._samples += samples
            if not client_error:  # a bad request is not the model's failure
                self._model_errors += 1

    def record(self, latency_ms: float | None, samples: int = 1,
               client_error: bool = False) -> None:
        """Either a success with its latency in ms, or (``None``) a failed request."""
        if latency_ms is None:
            self.record_error(samples, client_error)
        else:
            self.record_ns(round(latency_ms * 1_000_000), samples)

    @property
    def total_requests(self) -> int:
        return self._ok + self._errors

    @property
    def total_errors(self) -> int:
        return self._errors

    @property
    def total_model_errors(self) -> int:
        return self._model_errors

    @property
    def total_samples(self) -> int:
        return self._samples

    def totals(self) -> dict[str, int]:
        """Cumulative counts since start (never reset; for Prometheus counters)."""
        with self._lock:
            return {"requests": self._ok + self._errors, "errors": self._errors,
                    "samples": self._samples}

    def histogram(self) -> tuple[list[int], float]:
        """Cumulative (never reset) latency bucket counts and their sum in ms."""
        with self._lock:
            self._fold()
            return list(self._buckets), self._sum_ns / 1e6

    def snapshot(self, reset: bool = True) -> dict[str, Any]:
        now = time.time()
        with self._lock:
            ok0, errors0, samples0, since = self._window
            ok, errors, samples = self._ok - ok0, self._errors - errors0, self._samples - samples0
            window = self._ring_tail(min(ok, LATENCY_RING_SIZE))
            if reset:
                self._window = (self._ok, self._errors, self._samples, now)
        lat = np.asarray(window, dtype=np.float64) / 1e6
        return {"requests": ok + errors, "errors": errors, "samples": samples,
                "input_rate_per_s": samples / max(1e-9, now - since),
                "latency_ms": _percentiles(lat)}

    def _ring_tail(self, count: int) -> list[int]:
        """The newest ``count`` (<= the ring size) latencies, oldest first (caller holds
        the lock)."""
        if count == 0:
            return []
        end = self._ok & _RING_MASK
        start = (self._ok - count) & _RING_MASK
        if start < end:
            return self._ring[start:end]
        return self._ring[start:] + self._ring[:end]


def _percentiles(lat: np.ndarray) -> dict[str, float | None]:
    if lat.size == 0:
        return {"p50": None, "p95": None, "p99": None, "count": 0}
    p50, p95, p99 = np.percentile(lat, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "count": int(lat.size)}


class _Serving:
    """One served model with what a request needs resolved at swap time."""

    __slots__ = ("loaded", "stats", "run", "record_ns", "specs", "input_name", "dtype",
                 "rank", "tail", "finite", "observe", "ids")

    def __init__(self, loaded: LoadedModel, stats: ModelStats, quality: Any = None) -> None:
        self.loaded, self.stats = loaded, stats
        # quality monitoring (agent.quality.hub): observe(inputs, outputs, batch) -> id
        self.observe: Callable[..., int] | None = None
        self.ids: Callable[[int], str] = str  # the request id from the first sample id
        if quality is not None:
            self.observe, self.ids = quality.observer(loaded)
        self.run = loaded.runtime.run
        self.record_ns = stats.record_ns
        self.specs = loaded.installed.manifest.inputs
        spec = self.specs[0] if len(self.specs) == 1 else None
        fast = spec is not None and len(spec.shape) >= 1 and \
            all(d is not None for d in spec.shape[1:])
        # no fast path (input_name None): every request takes the general, explaining one
        self.input_name: str | None = None
        self.dtype: np.dtype | None = None
        self.rank = -1
        self.tail: tuple[int | None, ...] = ()
        if spec is not None and fast:
            self.input_name, self.dtype = spec.name, np.dtype(spec.dtype)
            self.rank, self.tail = len(spec.shape), tuple(spec.shape[1:])
        self.finite = self.dtype is not None and self.dtype.kind == "f"

    def accepts(self, x: np.ndarray, check_values: bool) -> bool:
        """True when ``x`` passes every signature check (false: take the general path,
        which accepts convertible input or raises with the reason)."""
        shape = x.shape
        return (x.dtype is self.dtype and len(shape) == self.rank and shape[1:] == self.tail
                and shape[0] <= MAX_BATCH and not (
                    check_values and self.finite and not all_finite(x)))


_llm_lock = threading.RLock()


class ModelServer:
    def __init__(self) -> None:
        self._serving: dict[str, _Serving] = {}
        self._kept: dict[str, _Serving] = {}  # name -> the version a trial may revert to
        self._lock = threading.Lock()
        self.stats: dict[str, ModelStats] = {}
        self.shadows: dict[str, Any] = {}  # name -> agent.shadow.ShadowRun (issue 4)
        #: agent.quality.hub.QualityHub: request ids, drift sketches, feedback (None: off)
        self.quality: Any = None
        #: False while the agent starts (models on disk not loaded yet): not ready
        self.ready = True

    def configure_llm(self, build: Callable[[ModelServer], Any]) -> None:
        """``build(self)`` makes the language-model front end (``agent.llm.http.configure``
        with the agent's admission bounds) when it is first looked up: an agent that never
        serves a language model never imports it."""
        self.__dict__["_llm_build"] = build

    def __getattr__(self, name: str) -> Any:
        """``agent.llm.http.frontend`` keeps its state in an attribute of this object: the
        first lookup after :meth:`configure_llm` builds it."""
        if name != FRONTEND_ATTR:
            raise AttributeError(name)
        with _llm_lock:  # reentrant: build() looks the attribute up again
            if name in self.__dict__:  # another thread built it while this one waited
                return self.__dict__[name]
            build = self.__dict__.pop("_llm_build", None)
            if build is None:
                raise AttributeError(name)
            return build(self)

    def swap(self, loaded: LoadedModel, keep_previous: bool = False) -> LoadedModel | None:
        """Serve ``loaded``; ``keep_previous``: keep the version it replaces loaded beside it
        (a trial's way back), reachable by version until :meth:`drop_kept`."""
        name = loaded.installed.model
        with self._lock:
            stats = self.stats.setdefault(name, ModelStats())
        entry = _Serving(loaded, stats, self.quality)
        with self._lock:
            old = self._serving.get(name)
            self._serving[name] = entry
            kept = old if keep_previous and old is not None and \
                old.loaded.installed.version != loaded.installed.version else None
            if kept is not None:
                self._kept[name] = _Serving(kept.loaded, ModelStats(), self.quality)
            else:
                self._kept.pop(name, None)
        if old is not None and old.loaded.installed.version != loaded.installed.version:
            # Telemetry labels a window with the version being served when it is sent: start a
            # fresh window so the old version's latencies are never reported as the new one's
            # (rollout gates compare the two). Cumulative totals are kept.
            stats.snapshot(reset=True)
        return old.loaded if old is not None else None

    def find(self, name: str) -> LoadedModel | None:
        entry = self._serving.get(name)
        return entry.loaded if entry is not None else None

    def remove(self, name: str) -> LoadedModel | None:
        with self._lock:
            entry = self._serving.pop(name, None)
            self._kept.pop(name, None)
        return entry.loaded if entry is not None else None

    def kept(self, name: str) -> LoadedModel | None:
        entry = self._kept.get(name)
        return entry.loaded if entry is not None else None

    def drop_kept(self, name: str) -> None:
        """The trial is over (committed or reverted): the previous version is unloaded."""
        with self._lock:
            self._kept.pop(name, None)

    def versions(self, name: str) -> dict[int, LoadedModel]:
        """What the device holds loaded for ``name``, by version: the served one and, during
        a trial, the kept previous one or, during a shadow run, the candidate."""
        found: dict[int, LoadedModel] = {}
        for entry in (self._kept.get(name), self._serving.get(name)):
            if entry is not None:
                found[entry.loaded.installed.version] = entry.loaded
        shadow = self.shadows.get(name)
        if shadow is not None and name in self._serving:
            candidate = shadow.candidate
            found.setdefault(candidate.installed.version, candidate)
        return dict(sorted(found.items()))

    def stats_for(self, name: str) -> ModelStats:
        with self._lock:
            return self.stats.setdefault(name, ModelStats())

    def get(self, name: str) -> LoadedModel:
        entry = self._serving.get(name)
        if entry is None:
            raise ModelNotFoundError(f"no model named {name!r} is being served")
        return entry.loaded

    def models(self) -> list[LoadedModel]:
        with self._lock:
            return [entry.loaded for entry in self._serving.values()]

    def predict(self, name: str, raw_inputs: Any, *, check_values: bool = False,
                version: int | None = None) -> tuple[list[np.ndarray], LoadedModel]:
        """:meth:`predict_tracked` without the request id."""
        outputs, loaded, _ = self.predict_tracked(name, raw_inputs, check_values=check_values,
                                                  version=version, with_id=False)
        return outputs, loaded

    def predict_tracked(self, name: str, raw_inputs: Any, *, check_values: bool = False,
                        version: int | None = None, with_id: bool = True
                        ) -> tuple[list[np.ndarray], LoadedModel, str | None]:
        """Check ``raw_inputs`` against the served model's signature, run it, record it.
        A single-input model takes the array itself; otherwise a dict name → array.
        Shape and dtype are always checked. ``check_values=True`` also refuses float inputs
        holding NaN or infinity: the local API (an outside caller) asks for it; in-process
        callers get what the bare runtime does (NaN in, NaN out), since that scan costs
        more than the rest of the agent's per-call work on a small model. The third value
        is the request id feedback refers to (None when quality monitoring is off)."""
        entry = self._serving.get(name)
        if entry is None:
            raise ModelNotFoundError(f"no model named {name!r} is being served")
        if version is not None and version != entry.loaded.installed.version:
            return self._predict_other(name, version, raw_inputs, check_values)
        inputs: dict[str, np.ndarray]
        if type(raw_inputs) is np.ndarray and entry.input_name is not None and \
                entry.accepts(raw_inputs, check_values):
            inputs, batch = {entry.input_name: raw_inputs}, raw_inputs.shape[0]
        else:
            inputs, batch = _checked(entry, raw_inputs, check_values)
        start = perf_counter_ns()
        try:
            outputs = entry.run(inputs)
        except Exception as e:
            entry.stats.record_error(batch)
            raise EdgeshipError(f"inference failed: {e}") from e
        entry.record_ns(perf_counter_ns() - start, batch)
        if self.shadows:
            shadow = self.shadows.get(name)
            if shadow is not None:
                shadow.offer(inputs, outputs)
        observe = entry.observe
        if observe is None:
            return outputs, entry.loaded, None
        first = observe(inputs, outputs, batch)
        return outputs, entry.loaded, entry.ids(first) if with_id else None


    def _predict_other(self, name: str, version: int, raw_inputs: Any,
                       check_values: bool) -> tuple[list[np.ndarray], LoadedModel, str | None]:
        """A version held beside the served one (kept or shadow candidate), asked for by
        number: checked the same way, run, and counted apart (its errors never count
        against the served version's trial)."""
        loaded = self.versions(name).get(version)
        if loaded is None:
            raise ModelNotFoundError(f"{name} has no version {version} on this device")
        entry = self._kept.get(name)
        if entry is None or entry.loaded is not loaded:
            entry = _Serving(loaded, ModelStats(), self.quality)
        inputs, batch = _checked(entry, raw_inputs, check_values)
        try:
            outputs = entry.run(inputs)
        except Exception as e:
            raise EdgeshipError(f"inference failed: {e}") from e
        if entry.observe is None:
            return outputs, loaded, None
        return outputs, loaded, entry.ids(entry.observe(inputs, outputs, batch))


def _checked(entry: _Serving, raw_inputs: Any,
             check_values: bool) -> tuple[dict[str, np.ndarray], int]:
    """The general path: converts what can be converted, else raises (a client error)."""
    try:
        inputs = coerce_inputs(entry.specs, raw_inputs, max_batch=MAX_BATCH,
                               check_values=check_values)
    except InferenceInputError:
        entry.stats.record_error(client_error=True)
        raise
    first = next(iter(inputs.values()), None)
    batch = int(first.shape[0]) if first is not None and first.ndim else 1
    return inputs, batch
