"""The request path and the fold.

Per request (``ModelQuality.observe``, on the serving thread): take the next request id and
keep a reference to the request's input and output arrays in a short list — a lock, a
counter, a list append. Every ``fold_every`` requests (at most 256, fewer for large inputs
so the list never holds more than about ``PENDING_BYTES``), or when feedback, telemetry or
the flush thread asks, the list is *folded*: the arrays are stacked and every signal, the
estimate's score and the predicted class or value are computed for the whole batch at
once in NumPy. That is what makes the per-request cost a few microseconds.

In-process callers of ``ModelServer.predict`` hand over their arrays: the fold reads them up
to ``fold_every`` requests later. A caller that refills one input buffer in place (a camera
loop) sketches later frames than the ones it sent — the same distribution, not the same
samples.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from edgeship.agent.quality.drift import (SlidingWindow, WindowSettings, bin_indices,
                                          chance_js, js_distance, psi)
from edgeship.agent.quality.features import (atc_scores, class_probabilities, input_columns,
                                             output_columns, score_kind)
from edgeship.agent.quality.profile import Estimator, Profile, ScorePlan

FOLD_EVERY = 256
PENDING_BYTES = 1 << 20
#: signals sent in one telemetry record (largest drift first); the rest are counted
MAX_REPORTED_SIGNALS = 24


@dataclass(frozen=True)
class Folded:
    """What a fold hands to the feedback store: sample ids, request ids, predictions."""

    version: int
    samples: np.ndarray   # int64 sample counters
    requests: np.ndarray  # int64 counter of each sample's request (its first sample)
    predicted: np.ndarray  # float64: class index or predicted value; NaN when unknown


class VersionSketch:
    """The drift window and the label-free estimate of one served version."""

    def __init__(self, profile: Profile, variant: str, settings: WindowSettings) -> None:
        self.profile = profile
        self.signals = profile.signals
        self.estimator = profile.estimator(variant)
        self.window = SlidingWindow([s.bins for s in self.signals], settings)
        self.by_input: dict[str, list[int]] = {}
        for k, ref in enumerate(self.signals):
            if ref.spec.is_input:
                self.by_input.setdefault(ref.spec.tensor, []).append(k)
        self.output_indices = [k for k, r in enumerate(self.signals) if not r.spec.is_input]
        stats = [r.spec.stat for r in self.signals]
        # the estimate's score is one of the signals: computed once (sign: higher = surer)
        score = {"confidence": ("confidence", 1.0), "negative_entropy": ("entropy", -1.0)}
        stat, self._sign = score.get(self.estimator.score if self.estimator else "",
                                     ("", 1.0))
        self._score_column = stats.index(stat) if stat in stats else None
        self._doc = self.estimator is not None and self.estimator.method == "doc"
        self._confidence_column = stats.index("confidence") if "confidence" in stats else None
        self._lock = threading.Lock()

    def add(self, columns: Sequence[np.ndarray], probs: np.ndarray | None) -> None:
        if not columns:
            return
        bins = np.stack([bin_indices(col, ref.edges)
                         for col, ref in zip(columns, self.signals)], axis=1)
        above = confidence = None
        if self.estimator is not None and probs is not None:
            if self._score_column is not None:
                score = self._sign * columns[self._score_column]
            else:
                score = atc_scores(probs, self.estimator.score)
            above = score > self.estimator.threshold
            if self._doc:
                confidence = columns[self._confidence_column] \
                    if self._confidence_column is not None else probs.max(axis=1)
        with self._lock:
            self.window.add(bins, above, confidence)

    def report(self) -> dict[str, Any]:
        with self._lock:
            n, counts, above = self.window.totals()
            total = self.window.total
            confidence_sum = self.window.confidence_sum
        signals = {}
        for ref, c in zip(self.signals, counts):
            signals[ref.spec.name] = {
                "js": _round(js_distance(c, ref.ref)), "psi": _round(psi(c, ref.ref)),
                "chance": _round(chance_js(ref.bins, n, self.profile.samples)),
                "counts": c.tolist(), "ref": [round(float(x), 5) for x in ref.ref]}
        ordered = sorted(signals.items(), key=lambda kv: -(kv[1]["js"] or 0.0))
        doc: dict[str, Any] = {"samples": n, "seen": total,
                               "reference_samples": self.profile.samples,
                               "signals": dict(ordered[:MAX_REPORTED_SIGNALS])}
        if len(ordered) > MAX_REPORTED_SIGNALS:
            doc["signals_omitted"] = len(ordered) - MAX_REPORTED_SIGNALS
        if self.estimator is not None:
            doc["estimate"] = _estimate(self.estimator, n, above, confidence_sum)
        return doc


def _estimate(e: Estimator, n: int, above: int, confidence_sum: float) -> dict[str, Any]:
    """The window's label-free estimate. ``above`` is what the fleet pools (sums over
    devices, then divides by the summed samples): the ATC count, or with DoC the estimate
    times n rounded to a whole sample (DoC is linear, so pooling stays exact to 1/n)."""
    atc = {"method": "atc", "score": e.score, "samples": n, "above": above,
           "accuracy": above / n if n else None, "reference_accuracy": e.accuracy}
    if e.method != "doc":
        return atc
    est = e.doc_accuracy(confidence_sum, n)
    return {"method": "doc", "samples": n,
            "above": 0 if est is None else int(round(est * n)), "accuracy": est,
            "mean_confidence": confidence_sum / n if n else None,
            "reference_accuracy": e.accuracy,
            "reference_confidence": e.mean_confidence, "atc": atc}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 5)


class VersionTracker:
    """One served version of a model: how its outputs become predictions, and its
    sketch (None without a reference profile)."""

    def __init__(self, version: int, variant: str, task: str, plan: ScorePlan | None,
                 sketch: VersionSketch | None, input_names: Sequence[str]) -> None:
        self.version = version
        self.variant = variant
        self.task = task
        self.plan = plan
        self.sketch = sketch
        self.input_names = tuple(input_names)
        self._score_index: int | None = None

    def bind_outputs(self, output_names: Sequence[str]) -> None:
        names = list(output_names)
        target = self.plan.output if self.plan is not None else None
        self._score_index = names.index(target) if target in names else 0

    def fold(self, items: list[tuple[Any, ...]]) -> Folded:
        """``items``: (first sample id, batch, inputs, outputs, ...) per request."""
        firsts = np.fromiter((i[0] for i in items), dtype=np.int64, count=len(items))
        # intp: on a 32-bit device np.repeat refuses int64 counts
        sizes = np.fromiter((i[1] for i in items), dtype=np.intp, count=len(items))
        if int(sizes.max(initial=0)) > 1:
            samples = np.concatenate([np.arange(f, f + s) for f, s in zip(firsts, sizes)])
            requests = np.repeat(firsts, sizes)
        else:
            samples = requests = firsts
        index = self._score_index or 0
        scores = _stack([i[3][index] for i in items])
        probs, predicted = self._predicted(scores)
        if len(predicted) != len(samples):  # outputs without one row per sample
            return Folded(self.version, samples, requests, np.full(len(samples), np.nan))
        if self.sketch is not None and scores is not None:
            self._sketch(items, scores, probs)
        return Folded(self.version, samples, requests, predicted)

    def _predicted(self, scores: np.ndarray | None
                   ) -> tuple[np.ndarray | None, np.ndarray]:
        """(class probabilities of a classifier or None, predicted class or value)."""
        if scores is None:
            return None, np.empty(0)
        if self.task == "classification" and self.plan is not None:
            kind = self.plan.kind or score_kind(scores)
            probs = class_probabilities(scores, kind)
            return probs, probs.argmax(axis=1).astype(np.float64)
        if self.task == "regression":
            return None, scores.reshape(scores.shape[0], -1)[:, 0].astype(np.float64)
        return None, np.full(scores.shape[0], np.nan)

    def _sketch(self, items: list, scores: np.ndarray, probs: np.ndarray | None) -> None:
        sketch = self.sketch
        assert sketch is not None
        specs = [s.spec for s in sketch.signals]
        columns: list[np.ndarray | None] = [None] * len(specs)
        for name, wanted in sketch.by_input.items():
            batch = _stack([_input(i[2], name, self.input_names) for i in items])
            if batch is None or batch.shape[0] != scores.shape[0]:
                return  # inputs without one row per sample: not sketched
            for k, col in zip(wanted, input_columns(batch, [specs[k] for k in wanted])):
                columns[k] = col
        out_idx = sketch.output_indices
        out_cols = output_columns(scores, [specs[k] for k in out_idx], probs)
        for k, col in zip(out_idx, out_cols):
            columns[k] = col
        sketch.add(columns, probs)  # type: ignore[arg-type]


def _input(inputs: Any, name: str, names: Sequence[str]) -> np.ndarray | None:
    if isinstance(inputs, dict):
        return inputs.get(name)
    return inputs if names and names[0] == name else None


def _stack(arrays: list[np.ndarray | None]) -> np.ndarray | None:
    """The arrays joined along the batch axis; None when one is missing or they differ in
    shape after the batch axis (dynamic shapes: a fold of mixed sizes is not sketched)."""
    if len(arrays) == 1:
        a = arrays[0]
        return a if a is not None and a.ndim else None
    try:
        return np.concatenate(arrays, axis=0)  # type: ignore[arg-type]
    except (ValueError, TypeError):  # None, 0-d or mixed shapes
        return None


class ModelQuality:
    """Request ids and pending requests of one model (all its versions)."""

    def __init__(self, model: str, sink: Callable[[str, Folded], None]) -> None:
        self.model = model
        self.boot = os.urandom(4).hex()  # ids differ across restarts (secrets.token_hex)
        self._sink = sink
        self._lock = threading.Lock()
        self._fold_lock = threading.Lock()
        self._next = 0
        #: (first sample id, batch, inputs, outputs, tracker) per request
        self._pending: list[tuple[int, int, Any, list[np.ndarray], VersionTracker]] = []
        self.fold_every = FOLD_EVERY

    def observe(self, tracker: VersionTracker, inputs: Any, outputs: list[np.ndarray],
                batch: int) -> int:
        """The request path: returns the request's first sample id."""
        with self._lock:
            first = self._next
            self._next = first + batch
            self._pending.append((first, batch, inputs, outputs, tracker))
            full = len(self._pending) >= self.fold_every
        if full:
            self.fold()
        return first

    def request_id(self, first: int) -> str:
        return f"{self.boot}-{first}"

    def fold(self) -> None:
        with self._lock:
            items, self._pending = self._pending, []
        if not items:
            return
        with self._fold_lock:
            self._adapt(items)
            first = items[0][4]
            if all(i[4] is first for i in items):  # the usual case: one served version
                self._sink(self.model, first.fold(items))
                return
            by_tracker: dict[int, list] = {}
            for item in items:
                by_tracker.setdefault(id(item[4]), []).append(item)
            for group in by_tracker.values():
                self._sink(self.model, group[0][4].fold(group))

    def _adapt(self, items: list) -> None:
        """Fewer requests per fold when they are large (bounded pending memory; judged
        by the fold's first and last request)."""
        biggest = max(_nbytes(items[0][2]), _nbytes(items[-1][2]))
        self.fold_every = int(max(1, min(FOLD_EVERY, PENDING_BYTES // max(1, biggest))))


def _nbytes(inputs: Any) -> int:
    if isinstance(inputs, dict):
        return sum(getattr(a, "nbytes", 0) for a in inputs.values())
    return int(getattr(inputs, "nbytes", 0))
