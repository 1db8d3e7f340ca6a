"""Quality metrics from counts, with confidence intervals, and the comparisons gates use.

Pure; the device computes its own numbers with it and the fleet, which sums the counts of
many devices, computes the pooled ones with the same code.

Classifiers are counted per class (true positives, false positives, false negatives): that
is enough for accuracy and per-class and macro precision, recall and F1, and sums exactly
across devices. Regression keeps n, Σ|e|, Σe² and Σe⁴ (MAE, RMSE and their intervals).

Intervals (``confidence`` two-sided, 0.95 by default): accuracy uses Wilson's score
interval; macro precision, recall and F1 a delta-method variance turned into Wilson's
interval at the effective sample size (:mod:`agent.quality.intervals`; F1 exact from the
confusion counts kept for up to 64 classes, else a conservative bound from the per-class
counts, named in the report's ``f1_macro_ci_method``); MAE and RMSE normal intervals from the
sample moments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

import numpy as np

from edgeship.agent.quality.intervals import (CONFUSION_MAX_CLASSES, F1_METHODS, MacroEstimate,
                                              macro_f1_estimate, macro_interval,
                                              macro_proportion_estimate, wilson, z_value)


class ClassCounts:
    """Labelled outcomes of a classifier: per class tp/fp/fn, and n; with up to
    CONFUSION_MAX_CLASSES classes also the confusion counts (truth × prediction), which the
    macro F1 interval needs. ``confusion`` is None when it was not kept from the first label
    on (counts from an older agent, or more classes): then the F1 interval is a bound."""

    def __init__(self, classes: int, tp: np.ndarray | None = None,
                 fp: np.ndarray | None = None, fn: np.ndarray | None = None,
                 confusion: np.ndarray | None = None) -> None:
        self.classes = classes
        zeros = np.zeros(classes, dtype=np.int64)
        self.tp = zeros.copy() if tp is None else tp
        self.fp = zeros.copy() if fp is None else fp
        self.fn = zeros.copy() if fn is None else fn
        if confusion is None and tp is None and classes <= CONFUSION_MAX_CLASSES:
            confusion = np.zeros((classes, classes), dtype=np.int64)
        self.confusion = confusion

    @property
    def n(self) -> int:
        return int(self.tp.sum() + self.fn.sum())

    @property
    def correct(self) -> int:
        return int(self.tp.sum())

    def add(self, predicted: int, truth: int) -> None:
        if max(predicted, truth) >= self.classes:
            self._grow(max(predicted, truth) + 1)
        if predicted == truth:
            self.tp[truth] += 1
        else:
            self.fp[predicted] += 1
            self.fn[truth] += 1
        if self.confusion is not None:
            self.confusion[truth, predicted] += 1

    def merge(self, other: "ClassCounts") -> None:
        if other.classes > self.classes:
            self._grow(other.classes)
        k = other.classes
        self.tp[:k] += other.tp
        self.fp[:k] += other.fp
        self.fn[:k] += other.fn
        if self.confusion is None or other.confusion is None:
            self.confusion = None
        else:
            self.confusion[:k, :k] += other.confusion

    def _grow(self, classes: int) -> None:
        pad = classes - self.classes
        self.tp, self.fp, self.fn = (np.concatenate([a, np.zeros(pad, np.int64)])
                                     for a in (self.tp, self.fp, self.fn))
        if self.confusion is not None:
            self.confusion = np.pad(self.confusion, (0, pad)) \
                if classes <= CONFUSION_MAX_CLASSES else None
        self.classes = classes

    def to_dict(self) -> dict[str, Any]:
        doc = {"task": "classification", "n": self.n, "tp": self.tp.tolist(),
               "fp": self.fp.tolist(), "fn": self.fn.tolist()}
        if self.confusion is not None:
            # the wrong predictions only (the diagonal is tp): [truth, predicted, count]
            t, p = np.nonzero(self.confusion)
            doc["confusion"] = [[int(i), int(j), int(self.confusion[i, j])]
                                for i, j in zip(t, p) if i != j]
        return doc

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], max_classes: int = 100_000) -> "ClassCounts":
        arrays = [np.asarray(doc[k], dtype=np.int64).reshape(-1) for k in ("tp", "fp", "fn")]
        k = len(arrays[0])
        if not 0 < k <= max_classes or any(len(a) != k for a in arrays) or \
                any(bool((a < 0).any()) for a in arrays):
            raise ValueError("tp, fp, fn must be equal-length lists of counts >= 0")
        tp, fp, fn = arrays
        confusion = _confusion_from(doc.get("confusion"), tp, fp, fn)
        if confusion is None and int(tp.sum() + fn.sum()) == 0 and \
                k <= CONFUSION_MAX_CLASSES:
            confusion = np.zeros((k, k), dtype=np.int64)  # nothing counted yet: start one
        return cls(k, tp, fp, fn, confusion)


def _confusion_from(cells: Any, tp: np.ndarray, fp: np.ndarray, fn: np.ndarray
                    ) -> np.ndarray | None:
    """The k×k matrix from [truth, predicted, count] triples of the wrong predictions,
    checked against the per-class counts; None when there are none (older senders)."""
    if cells is None:
        return None
    k = len(tp)
    arr = np.asarray(cells, dtype=np.int64).reshape(-1, 3) if len(cells) else \
        np.zeros((0, 3), np.int64)
    if k > CONFUSION_MAX_CLASSES or (arr < 0).any() or (arr[:, :2] >= k).any() or \
            (arr[:, 0] == arr[:, 1]).any():
        raise ValueError(f"confusion: [truth, predicted, count] of wrong predictions, "
                         f"classes < {k} <= {CONFUSION_MAX_CLASSES}")
    m = np.zeros((k, k), dtype=np.int64)
    np.add.at(m, (arr[:, 0], arr[:, 1]), arr[:, 2])
    if (m.sum(1) != fn).any() or (m.sum(0) != fp).any():
        raise ValueError("confusion does not add up to fp and fn")
    m[np.arange(k), np.arange(k)] = tp
    return m


@dataclass
class RegressionCounts:
    n: int = 0
    sum_abs: float = 0.0
    sum_sq: float = 0.0
    sum_quad: float = 0.0

    def add(self, predicted: float, truth: float) -> None:
        e = abs(predicted - truth)
        self.n += 1
        self.sum_abs += e
        self.sum_sq += e * e
        self.sum_quad += e ** 4

    def merge(self, other: "RegressionCounts") -> None:
        self.n += other.n
        self.sum_abs += other.sum_abs
        self.sum_sq += other.sum_sq
        self.sum_quad += other.sum_quad

    def to_dict(self) -> dict[str, Any]:
        return {"task": "regression", "n": self.n, "sum_abs": self.sum_abs,
                "sum_sq": self.sum_sq, "sum_quad": self.sum_quad}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> "RegressionCounts":
        n = int(doc["n"])
        values = [float(doc[k]) for k in ("sum_abs", "sum_sq", "sum_quad")]
        if n < 0 or any(not math.isfinite(v) or v < 0 for v in values):
            raise ValueError("n and sums must be finite and >= 0")
        return cls(n, *values)


Counts = Union[ClassCounts, RegressionCounts]  # not X | Y: this line runs (Python 3.9)


def counts_from_dict(doc: Mapping[str, Any]) -> Counts:
    if doc.get("task") == "regression":
        return RegressionCounts.from_dict(doc)
    return ClassCounts.from_dict(doc)


def pooled(items: Sequence[Counts]) -> Counts | None:
    """The sum of several devices' counts (all of one task), or None."""
    if not items:
        return None
    first = items[0]
    total: Counts = ClassCounts(first.classes) if isinstance(first, ClassCounts) \
        else RegressionCounts()
    for c in items:
        if type(c) is type(total):
            total.merge(c)  # type: ignore[arg-type]
    return total


# --- reports ------------------------------------------------------------------------------

def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def per_class(c: ClassCounts, labels: Sequence[str] = ()) -> list[dict[str, Any]]:
    rows = []
    for i in range(c.classes):
        tp, fp, fn = int(c.tp[i]), int(c.fp[i]), int(c.fn[i])
        if tp + fp + fn == 0:
            continue
        rows.append({"class": labels[i] if i < len(labels) else str(i), "support": tp + fn,
                     "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn),
                     "f1": _ratio(2 * tp, 2 * tp + fp + fn)})
    return rows


def macro_f1(c: ClassCounts) -> tuple[float | None, float | None]:
    """Macro F1 over the classes seen (in truth or prediction) and its standard error."""
    est, _ = macro_f1_estimate(c.tp, c.fp, c.fn, c.confusion)
    return (None, None) if est is None else (est.value, est.se)


def macro_proportion(hits: np.ndarray, totals: np.ndarray
                     ) -> tuple[float | None, float | None]:
    """Mean of the per-class proportions hits/totals over classes with totals > 0 (macro
    precision: tp over tp+fp; macro recall: tp over tp+fn) and its standard error."""
    est = macro_proportion_estimate(hits, totals)
    return (None, None) if est is None else (est.value, est.se)


#: a class seen with fewer labelled samples than this makes the macro intervals approximate
THIN_CLASS_LABELS = 8
#: what the simulation (``python -m bench.quality_intervals --by-thin``) measured
THIN_COVERAGE = "simulated: the 95 % macro F1 interval covers 0.91 with such classes, " \
    "0.95 without"


def thin_classes(c: ClassCounts, below: int = THIN_CLASS_LABELS) -> int:
    """Classes seen (in the labels or the predictions) with fewer than ``below`` labels."""
    seen = (c.tp + c.fp + c.fn) > 0
    return int((seen & (c.tp + c.fn < below)).sum())


def thin_note(c: ClassCounts) -> dict[str, Any]:
    """``thin_classes`` and ``macro_note`` when some class has too few labels for the macro
    intervals to hold their 95 % (accuracy's is unaffected); nothing otherwise."""
    k = thin_classes(c)
    if not k:
        return {}
    what = "1 class has" if k == 1 else f"{k} classes have"
    return {"thin_classes": k,
            "macro_note": f"{what} fewer than {THIN_CLASS_LABELS} labels: macro intervals "
                          f"are approximate ({THIN_COVERAGE})"}


def _value(est: MacroEstimate | None) -> float | None:
    return None if est is None else est.value


def classification_report(c: ClassCounts, labels: Sequence[str] = (),
                          confidence: float = 0.95) -> dict[str, Any]:
    n = c.n
    f1, f1_method = macro_f1_estimate(c.tp, c.fp, c.fn, c.confusion)
    precision = macro_proportion_estimate(c.tp, c.tp + c.fp)
    recall = macro_proportion_estimate(c.tp, c.tp + c.fn)
    interval = wilson(c.correct, n, confidence)
    return {"task": "classification", "samples": n,
            "accuracy": _ratio(c.correct, n),
            "accuracy_ci": list(interval) if interval else None,
            "precision_macro": _value(precision),
            "precision_macro_ci": macro_interval(precision, confidence),
            "recall_macro": _value(recall),
            "recall_macro_ci": macro_interval(recall, confidence),
            "f1_macro": _value(f1), "f1_macro_ci": macro_interval(f1, confidence),
            "f1_macro_ci_method": F1_METHODS[f1_method], **thin_note(c),
            "per_class": per_class(c, labels)}


def share_ci(doc: Mapping[str, Any], key: str) -> str:
    """``doc[key]`` as a percentage with its interval ``doc[key + "_ci"]`` when there is one
    (the CLIs' text), "-" when there is no number."""
    x, ci = doc.get(key), doc.get(f"{key}_ci")
    if x is None:
        return "-"
    return f"{x:.1%}" if not ci else f"{x:.1%} [{ci[0]:.1%}, {ci[1]:.1%}]"


def macro_note(doc: Mapping[str, Any]) -> str:
    """The labelled report's note on its macro intervals, "" when there is none."""
    note = doc.get("macro_note")
    return f" ({note})" if isinstance(note, str) and note else ""


def f1_ci(doc: Mapping[str, Any]) -> str:
    """Macro F1 to three places with its interval when there is one, "-" without a number."""
    f1, ci = doc.get("f1_macro"), doc.get("f1_macro_ci")
    if f1 is None:
        return "-"
    return f"{f1:.3f}" if not ci else f"{f1:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def regression_report(c: RegressionCounts, confidence: float = 0.95) -> dict[str, Any]:
    if c.n == 0:
        return {"task": "regression", "samples": 0, "mae": None, "rmse": None,
                "mae_ci": None, "rmse_ci": None}
    z = z_value(confidence)
    mae, mse = c.sum_abs / c.n, c.sum_sq / c.n
    sd_abs = math.sqrt(max(0.0, mse - mae * mae))
    sd_sq = math.sqrt(max(0.0, c.sum_quad / c.n - mse * mse))
    half_mae, half_mse = z * sd_abs / math.sqrt(c.n), z * sd_sq / math.sqrt(c.n)
    return {"task": "regression", "samples": c.n, "mae": mae, "rmse": math.sqrt(mse),
            "mae_ci": [max(0.0, mae - half_mae), mae + half_mae],
            "rmse_ci": [math.sqrt(max(0.0, mse - half_mse)), math.sqrt(mse + half_mse)]}


def report(c: Counts, labels: Sequence[str] = (), confidence: float = 0.95
           ) -> dict[str, Any]:
    if isinstance(c, ClassCounts):
        return classification_report(c, labels, confidence)
    return regression_report(c, confidence)


# --- comparisons (rollout gates) ------------------------------------------------------------

@dataclass(frozen=True)
class Comparison:
    """``drop`` = old - new (positive: the new one is worse); ``bound`` = the one-sided
    lower confidence bound of the drop; ``worse`` = bound > margin."""

    old: float
    new: float
    drop: float
    bound: float
    worse: bool


def compare(old: float, old_se: float, new: float, new_se: float, *, margin: float,
            confidence: float) -> Comparison:
    drop = old - new
    se = math.sqrt(old_se ** 2 + new_se ** 2)
    bound = drop - z_value(confidence, two_sided=False) * se
    return Comparison(old, new, drop, bound, bound > margin)


def proportion_se(k: int, n: int) -> float:
    p = k / n
    # never 0: a version right on every sample still has sampling uncertainty
    return math.sqrt(max(p * (1 - p), 1.0 / n) / n)


def samples_to_detect(p_old: float, drop: float, *, confidence: float = 0.95,
                      power: float = 0.8, margin: float = 0.0,
                      old_n: int | None = None) -> int:
    """Labelled samples of the new version needed to detect an accuracy ``drop`` with a
    one-sided test at ``confidence`` and ``power``; ``old_n`` None: as many as the new one
    (both measured in the field), else the old version's fixed count."""
    p_new = p_old - drop
    from statistics import NormalDist
    za, zb = z_value(confidence, False), NormalDist().inv_cdf(power)
    effect = drop - margin
    if effect <= 0:
        raise ValueError("the drop must exceed the margin")
    var_new, var_old = p_new * (1 - p_new), p_old * (1 - p_old)
    if old_n is None:
        return math.ceil((za + zb) ** 2 * (var_new + var_old) / effect ** 2)
    rest = effect ** 2 / (za + zb) ** 2 - var_old / old_n
    if rest <= 0:
        raise ValueError(f"{old_n} samples of the old version are too few")
    return math.ceil(var_new / rest)
