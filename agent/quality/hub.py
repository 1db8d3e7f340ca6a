"""QualityHub: what the agent wires in — serving's observers, feedback, telemetry.

``ModelServer.swap`` asks :meth:`QualityHub.observer` for each served version and calls the
returned function on every request. Folded predictions wait in memory (at most
``memory_samples`` samples plus the newest fold; past that the oldest are dropped and
counted as ``evicted_memory``) until the flush thread, a feedback request or a telemetry tick writes
them to the store (SQLite, ``disk_samples`` rows).
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from edgeship.agent.errors import BundleError
from edgeship.agent.quality import feedback as fb
from edgeship.agent.quality.drift import WindowSettings
from edgeship.agent.quality.monitor import Folded, ModelQuality, VersionSketch, VersionTracker
from edgeship.agent.quality.profile import ScorePlan, parse_profile, score_plan
from edgeship.agent.quality.store import FeedbackStore, VersionMeta

if TYPE_CHECKING:  # the label statistics load with the first labels (feedback or counts)
    from edgeship.agent.quality.metrics import Counts

logger = logging.getLogger(__name__)

#: labelled counts of at most this many versions per model go into telemetry
REPORTED_VERSIONS = 4
#: per-class counts are sent for up to this many classes (beyond: n and correct only)
MAX_REPORTED_CLASSES = 256


@dataclass(frozen=True)
class QualitySettings:
    window: WindowSettings = WindowSettings()
    memory_samples: int = 8192      # folded predictions waiting for the disk
    disk_samples: int = 100_000     # predictions kept on disk for feedback
    flush_interval_s: float = 2.0
    confidence: float = 0.95        # intervals in the local report


class QualityHub:
    def __init__(self, state_dir: Path, settings: QualitySettings = QualitySettings()
                 ) -> None:
        self.settings = settings
        self.store = FeedbackStore(Path(state_dir) / "quality.db", settings.disk_samples)
        self._models: dict[str, ModelQuality] = {}
        self._trackers: dict[tuple[str, int], VersionTracker] = {}
        self._profile_state: dict[tuple[str, int], str] = {}
        self._waiting: collections.deque[tuple[str, str, Folded]] = collections.deque()
        self._waiting_samples = 0
        self._lock = threading.Lock()        # models, trackers, waiting
        self._flush_lock = threading.Lock()  # one writer of waiting → store
        self._feedback_lock = threading.Lock()  # one feedback batch at a time
        self._counts: dict[str, dict[int, Counts]] = {}
        self._evicted: collections.Counter[str] = collections.Counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- serving -----------------------------------------------------------------------

    def observer(self, loaded: Any) -> tuple[Callable[..., int], Callable[[int], str]]:
        """(observe(inputs, outputs, batch) -> first sample id, id formatter) for a
        served version (``LoadedModel``)."""
        inst = loaded.installed
        tracker = self._tracker(inst)
        with self._lock:
            mq = self._models.get(inst.model)
            if mq is None:
                mq = self._models[inst.model] = ModelQuality(inst.model, self._sink)
        return functools.partial(mq.observe, tracker), mq.request_id

    def _tracker(self, inst: Any) -> VersionTracker:
        key = (inst.model, inst.version)
        with self._lock:
            found = self._trackers.get(key)
            if found is not None and found.variant == inst.variant.id:
                return found
        m = inst.manifest
        sketch, plan, state = None, score_plan(m.task, m.outputs, m.labels), "none"
        raw = getattr(m, "profile", None)
        if raw is not None:
            try:
                profile = parse_profile(raw)
                sketch = VersionSketch(profile, inst.variant.id, self.settings.window)
                plan = profile.score or plan
                state = "ok"
            except BundleError as e:
                state = f"invalid: {e}"
                logger.warning("%s v%d: %s (no drift sketches for it)", m.model, m.version, e)
        tracker = VersionTracker(m.version, inst.variant.id, m.task, plan, sketch,
                                 [s.name for s in m.inputs])
        tracker.bind_outputs([o.name for o in m.outputs])
        self.store.put_version(m.model, m.version, _meta(m.task, plan, m.labels))
        with self._lock:
            self._trackers[key] = tracker
            self._profile_state[key] = state
        return tracker

    def _sink(self, model: str, folded: Folded) -> None:
        mq = self._models[model]
        with self._lock:
            self._waiting.append((model, mq.boot, folded))
            self._waiting_samples += len(folded.samples)
            while self._waiting_samples > self.settings.memory_samples and \
                    len(self._waiting) > 1:  # the newest fold stays
                old_model, _, old = self._waiting.popleft()
                self._waiting_samples -= len(old.samples)
                self._evicted[old_model] += len(old.samples)  # written at the next flush

    # --- flushing ----------------------------------------------------------------------

    def fold_all(self) -> None:
        with self._lock:
            models = list(self._models.values())
        for mq in models:
            mq.fold()

    def flush(self) -> None:
        self.fold_all()
        with self._flush_lock:
            with self._lock:
                chunks = list(self._waiting)
                self._waiting.clear()
                self._waiting_samples = 0
                evicted, self._evicted = self._evicted, collections.Counter()
            self.store.add(chunks)
            for model, count in evicted.items():
                self.store.bump(model, {"evicted_memory": count})

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edgeship-quality",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.flush_interval_s):
            try:
                self.flush()
            except Exception:  # the flush must outlive any one failure
                logger.exception("quality flush failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.flush()
        finally:
            self.store.close()

    # --- feedback ----------------------------------------------------------------------

    def feedback(self, model: str, doc: Any) -> list[dict[str, Any]]:
        """Applies a feedback body; one result per item (status and, if not accepted,
        why). Raises FeedbackError when the body as a whole is unusable."""
        items = fb.parse_body(doc)
        self.flush()
        metas = self.store.versions(model)
        results: list[dict[str, Any]] = []
        by_boot: dict[str, list[fb.Item]] = {}
        for item in items:
            if item.error is not None:
                results.append(_result(item, f"invalid: {item.error}"))
            else:
                by_boot.setdefault(item.boot, []).append(item)
        with self._feedback_lock:
            for boot, group in by_boot.items():
                results += self._apply(model, boot, group, metas)
        tally = collections.Counter(r["status"] for r in results)
        self.store.bump(model, {"received": len(items), **{k: v for k, v in tally.items()
                                                           if k != "accepted"}})
        return results

    def _apply(self, model: str, boot: str, items: list[fb.Item],
               metas: dict[int, VersionMeta]) -> list[dict[str, Any]]:
        from edgeship.agent.quality.metrics import ClassCounts, counts_from_dict
        rows = self.store.lookup(model, boot, fb.lookup_samples(items))
        counts = {v: counts_from_dict(c.to_dict()) for v, c in self._load_counts(model).items()}
        results, labelled, touched = [], [], set()
        for item in items:
            why, truths = _judge(item, rows, metas)
            if why is not None:
                results.append(_result(item, why))
                continue
            for s, truth in zip(item.samples, truths):
                row = rows[s]
                c = counts.setdefault(row.version, _empty(metas[row.version]))
                predicted = float(row.predicted or 0.0)  # never None here (check_rows)
                if isinstance(c, ClassCounts):
                    c.add(int(predicted), int(truth))
                else:
                    c.add(predicted, float(truth))
                rows[s] = fb.Row(s, row.request, row.version, row.predicted, True)
                touched.add(row.version)
            labelled += item.samples
            results.append(_result(item, "accepted"))
        accepted = sum(1 for r in results if r["status"] == "accepted")
        self.store.label(model, boot, labelled,
                         {v: counts[v].to_dict() for v in touched}, {"accepted": accepted})
        self._counts[model] = counts  # after the commit: memory follows the disk
        return results

    def _load_counts(self, model: str) -> dict[int, Counts]:
        cached = self._counts.get(model)
        if cached is None:
            cached = _from_docs(self.store.counts(model))
            self._counts[model] = cached
        return cached

    # --- reports -----------------------------------------------------------------------

    def telemetry(self, served: dict[str, tuple[int, str]], flush: bool = True
                  ) -> dict[str, Any]:
        """The ``quality`` section of a telemetry record: per served model (name ->
        (version, variant)) the drift window and estimate, the labelled counts of its
        latest versions, and the feedback counters. ``flush`` False (a Prometheus scrape):
        fold, but write nothing."""
        if flush:
            self.flush()
        else:
            self.fold_all()
        return {model: self._model_doc(model, version, variant)
                for model, (version, variant) in served.items()}

    def _model_doc(self, model: str, version: int, variant: str) -> dict[str, Any]:
        with self._lock:
            tracker = self._trackers.get((model, version))
            state = self._profile_state.get((model, version), "none")
        doc: dict[str, Any] = {"version": version, "variant": variant, "profile": state}
        if tracker is not None and tracker.sketch is not None:
            doc["drift"] = tracker.sketch.report()
        doc["labelled"] = {str(v): _reported(c) for v, c in
                           sorted(self._load_counts(model).items())[-REPORTED_VERSIONS:]}
        doc["feedback"] = self.store.counters(model)
        meta = self.store.versions(model).get(version)
        if meta is not None and 0 < len(meta.labels) <= MAX_REPORTED_CLASSES:
            doc["labels"] = list(meta.labels)
        return doc

    def local_report(self, model: str, version: int, variant: str,
                     labels: tuple[str, ...]) -> dict[str, Any]:
        """``GET /v1/models/<m>/quality``: the same numbers, with metrics and intervals."""
        from edgeship.agent.quality.metrics import counts_from_dict, report
        doc = self.telemetry({model: (version, variant)})[model]
        doc["metrics"] = {v: report(counts_from_dict(d), labels, self.settings.confidence)
                          for v, d in doc["labelled"].items() if "tp" in d or "sum_abs" in d}
        return doc

    @property
    def nbytes(self) -> int:
        """Memory the sketches hold (their windows); predictions waiting are separate."""
        with self._lock:
            return sum(t.sketch.window.nbytes for t in self._trackers.values()
                       if t.sketch is not None)


def hub_for(state_dir: Path, window_samples: int, memory_samples: int,
            disk_samples: int) -> QualityHub:
    """The agent's hub from its config values."""
    blocks = QualitySettings.window.blocks
    window = WindowSettings(blocks, max(16, window_samples // blocks))
    return QualityHub(state_dir, QualitySettings(window=window, memory_samples=memory_samples,
                                                 disk_samples=max(1000, disk_samples)))


def _meta(task: str, plan: ScorePlan | None, labels: tuple[str, ...]) -> VersionMeta:
    classes = 0
    if plan is not None:
        classes = 2 if plan.classes == 1 else plan.classes
    return VersionMeta(task, max(classes, len(labels)), tuple(labels))


def _from_docs(docs: dict[int, dict[str, Any]]) -> dict[int, Counts]:
    if not docs:  # no labels yet: the statistics module stays unloaded
        return {}
    from edgeship.agent.quality.metrics import counts_from_dict
    return {v: counts_from_dict(doc) for v, doc in docs.items()}


def _reported(c: Counts) -> dict[str, Any]:
    """Counts as telemetry sends them (past MAX_REPORTED_CLASSES: n and correct only)."""
    from edgeship.agent.quality.metrics import ClassCounts
    if isinstance(c, ClassCounts) and c.classes > MAX_REPORTED_CLASSES:
        return {"task": "classification", "n": c.n, "correct": c.correct}
    return c.to_dict()


def _empty(meta: VersionMeta) -> Counts:
    from edgeship.agent.quality.metrics import ClassCounts, RegressionCounts
    if meta.task == "classification":
        return ClassCounts(max(1, meta.classes))
    return RegressionCounts()


def _judge(item: fb.Item, rows: dict[int, Any], metas: dict[int, VersionMeta]
           ) -> tuple[str | None, list[Any]]:
    """(why the item cannot be applied or None, its truths as class indexes or values)."""
    why = fb.check_rows(item, rows)
    if why is not None:
        return why, []
    meta = metas.get(rows[item.samples[0]].version)
    if meta is None:
        return "invalid: the prediction's version is unknown here", []
    truths = [fb.truth_of(t, meta) for t in item.truths]
    bad = next((t for t in truths if isinstance(t, str)), None)
    return (None if bad is None else f"invalid: {bad}"), truths


def _result(item: fb.Item, status: str) -> dict[str, Any]:
    kind, _, why = status.partition(": ")
    doc: dict[str, Any] = {"id": item.id, "status": kind}
    if why:
        doc["message"] = why
    return doc
