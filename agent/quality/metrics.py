"""Quality metrics from counts, with confidence intervals, and the comparisons gates use.

Pure; the device computes its own numbers with it and the fleet, which sums the counts of
many devices, computes the pooled ones with the same code.

Classifiers are counted per class (true positives, false positives, false negatives): that
is enough for accuracy and per-class and macro precision, recall and F1, and sums exactly
across devices. Regression keeps n, Σ|e|, Σe² and Σe⁴ (MAE, RMSE and their intervals).

Intervals (``confidence`` two-sided, 0.95 by default): accuracy uses Wilson's score
interval; macro precision and recall a normal interval around the mean of the per-class
proportions (each with its binomial variance, never 0), macro F1 a delta-method normal
interval that treats the per-class counts as independent Poisson counts (approximations:
both ignore the covariance between classes); MAE and RMSE normal intervals from the sample
moments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Mapping, Sequence, Union

import numpy as np


def z_value(confidence: float, two_sided: bool = True) -> float:
    tail = (1 - confidence) / 2 if two_sided else 1 - confidence
    return NormalDist().inv_cdf(1 - tail)


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval of a proportion k/n; None for n = 0."""
    if n <= 0:
        return None
    z = z_value(confidence)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


class ClassCounts:
    """Labelled outcomes of a classifier: per class tp/fp/fn, and n."""

    def __init__(self, classes: int, tp: np.ndarray | None = None,
                 fp: np.ndarray | None = None, fn: np.ndarray | None = None) -> None:
        self.classes = classes
        zeros = np.zeros(classes, dtype=np.int64)
        self.tp = zeros.copy() if tp is None else tp
        self.fp = zeros.copy() if fp is None else fp
        self.fn = zeros.copy() if fn is None else fn

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

    def merge(self, other: "ClassCounts") -> None:
        if other.classes > self.classes:
            self._grow(other.classes)
        k = other.classes
        self.tp[:k] += other.tp
        self.fp[:k] += other.fp
        self.fn[:k] += other.fn

    def _grow(self, classes: int) -> None:
        pad = classes - self.classes
        self.tp, self.fp, self.fn = (np.concatenate([a, np.zeros(pad, np.int64)])
                                     for a in (self.tp, self.fp, self.fn))
        self.classes = classes

    def to_dict(self) -> dict[str, Any]:
        return {"task": "classification", "n": self.n, "tp": self.tp.tolist(),
                "fp": self.fp.tolist(), "fn": self.fn.tolist()}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], max_classes: int = 100_000) -> "ClassCounts":
        arrays = [np.asarray(doc[k], dtype=np.int64).reshape(-1) for k in ("tp", "fp", "fn")]
        k = len(arrays[0])
        if not 0 < k <= max_classes or any(len(a) != k for a in arrays) or \
                any(bool((a < 0).any()) for a in arrays):
            raise ValueError("tp, fp, fn must be equal-length lists of counts >= 0")
        return cls(k, *arrays)


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
    present = (c.tp + c.fp + c.fn) > 0
    if not present.any():
        return None, None
    a = 2.0 * c.tp[present]
    b = (c.fp + c.fn)[present].astype(np.float64)
    f1 = a / (a + b)
    var = (b * b * 2.0 * a + a * a * b) / np.maximum(a + b, 1.0) ** 4
    k = int(present.sum())
    return float(f1.mean()), float(math.sqrt(var.sum()) / k)


def macro_proportion(hits: np.ndarray, totals: np.ndarray
                     ) -> tuple[float | None, float | None]:
    """Mean of the per-class proportions hits/totals over classes with totals > 0 (macro
    precision: tp over tp+fp; macro recall: tp over tp+fn) and its standard error."""
    present = totals > 0
    if not present.any():
        return None, None
    k, n = hits[present], totals[present]
    var = [proportion_se(int(a), int(b)) ** 2 for a, b in zip(k, n)]
    return float((k / n).mean()), float(math.sqrt(sum(var)) / len(var))


def _interval(value: float | None, se: float | None, confidence: float
              ) -> list[float] | None:
    if value is None or se is None:
        return None
    half = z_value(confidence) * se
    return [max(0.0, value - half), min(1.0, value + half)]


def classification_report(c: ClassCounts, labels: Sequence[str] = (),
                          confidence: float = 0.95) -> dict[str, Any]:
    n = c.n
    f1, f1_se = macro_f1(c)
    precision, precision_se = macro_proportion(c.tp, c.tp + c.fp)
    recall, recall_se = macro_proportion(c.tp, c.tp + c.fn)
    interval = wilson(c.correct, n, confidence)
    return {"task": "classification", "samples": n,
            "accuracy": _ratio(c.correct, n),
            "accuracy_ci": list(interval) if interval else None,
            "precision_macro": precision,
            "precision_macro_ci": _interval(precision, precision_se, confidence),
            "recall_macro": recall, "recall_macro_ci": _interval(recall, recall_se, confidence),
            "f1_macro": f1, "f1_macro_ci": _interval(f1, f1_se, confidence),
            "per_class": per_class(c, labels)}


def share_ci(doc: Mapping[str, Any], key: str) -> str:
    """``doc[key]`` as a percentage with its interval ``doc[key + "_ci"]`` when there is one
    (the CLIs' text), "-" when there is no number."""
    x, ci = doc.get(key), doc.get(f"{key}_ci")
    if x is None:
        return "-"
    return f"{x:.1%}" if not ci else f"{x:.1%} [{ci[0]:.1%}, {ci[1]:.1%}]"


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
