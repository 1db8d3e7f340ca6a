"""Confidence intervals of proportions and of macro averages over classes, from counts.

Pure; :mod:`agent.quality.metrics` builds the reports with it (device and fleet alike).

Macro F1 (the mean over the classes seen of ``2 tp / (2 tp + fp + fn)``): a delta-method
variance. One wrong prediction is a false negative of its true class and a false positive
of the predicted one, so the per-class F1s move together; with the confusion matrix (kept
for up to ``CONFUSION_MAX_CLASSES`` classes) that covariance is exact:

    Var = (1/K²) [Σ_c tp_c (2 (1 − F_c) / S_c)² + Σ_{i≠j} n_ij (F_i / S_i + F_j / S_j)²]

(``S_c = 2 tp_c + fp_c + fn_c``; the cells' multinomial covariance adds nothing because F1
is scale-free). Without it (more classes, or counts from an agent that did not keep one)
``(a + b)² ≤ 2 a² + 2 b²`` gives an upper bound from the per-class counts alone. The variance
is computed on counts with one pseudo-error spread over the cells as if truth and prediction
were independent (never 0 when no error was seen), turned into an effective sample size
``F (1 − F) / Var`` and the interval is Wilson's at that size (asymmetric near 1), centred on
F plus its second-order bias (``2 tp e / S³`` per class: F1 from few counts reads low).

Macro precision and recall: a normal interval around the mean of the per-class proportions,
each binomial with at least one error's worth of variance (given the classes' totals the
classes are independent, so there is no covariance to miss; simulated, it covers 93–97 %).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

#: the agent and the fleet keep the k×k confusion counts up to this many classes
CONFUSION_MAX_CLASSES = 64
#: pseudo-errors added (spread as if independent) before the variance is computed
PSEUDO_ERRORS = 1.0
F1_METHODS = {"confusion": "delta method on the confusion matrix, Wilson at the effective n",
              "bound": "delta method, per-class counts only (conservative bound), Wilson at "
                       "the effective n"}


def z_value(confidence: float, two_sided: bool = True) -> float:
    from statistics import NormalDist  # (statistics pulls fractions and decimal: ~0.7 MB)
    tail = (1 - confidence) / 2 if two_sided else 1 - confidence
    return NormalDist().inv_cdf(1 - tail)


def wilson(k: float, n: float, confidence: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval of a proportion k/n (n may be an effective, non-integer size);
    None for n = 0."""
    if n <= 0:
        return None
    z = z_value(confidence)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(0.0, p * (1 - p)) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


class MacroEstimate(NamedTuple):
    value: float
    se: float            # delta-method standard error (what the gates compare)
    interval_n: float    # effective sample size of the interval
    centre: float        # value + bias correction (F1) or value


def macro_interval(m: MacroEstimate | None, confidence: float) -> list[float] | None:
    """Wilson's interval around ``m.centre`` at the effective sample size (0: normal)."""
    if m is None:
        return None
    if m.interval_n <= 0:
        half = z_value(confidence) * m.se
        return [max(0.0, m.centre - half), min(1.0, m.centre + half)]
    ci = wilson(min(1.0, max(0.0, m.centre)) * m.interval_n, m.interval_n, confidence)
    return None if ci is None else [ci[0], ci[1]]


def _effective_n(value: float, var: float, n: int) -> float:
    if var <= 0 or value <= 0 or value >= 1:
        return float(max(n, 1))
    return max(1.0, value * (1 - value) / var)


def _pseudo_errors(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(pseudo fp, pseudo fn, pseudo off-diagonal cells): PSEUDO_ERRORS spread over the
    off-diagonal cells in proportion to (truth share) × (prediction share)."""
    rows, cols = (tp + fn).astype(np.float64), (tp + fp).astype(np.float64)
    cells = np.outer(rows, cols)
    np.fill_diagonal(cells, 0.0)
    total = cells.sum()
    if total <= 0:
        zero = np.zeros_like(rows)
        return zero, zero, None
    cells *= PSEUDO_ERRORS / total
    return cells.sum(0), cells.sum(1), cells


def macro_f1_estimate(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray,
                      confusion: np.ndarray | None) -> tuple[MacroEstimate | None, str]:
    """Macro F1 over the classes seen, with its variance (exact with ``confusion``, else
    the bound), and the method's key in F1_METHODS."""
    method = "bound" if confusion is None else "confusion"
    present = (tp + fp + fn) > 0
    if not present.any():
        return None, method
    k = int(present.sum())
    s = (2 * tp + fp + fn).astype(np.float64)
    value = float((2 * tp[present] / s[present]).mean())
    e = (fp + fn).astype(np.float64)
    bias = float((2 * tp * e / np.maximum(s, 1.0) ** 3)[present].mean())
    pfp, pfn, pcells = _pseudo_errors(tp, fp, fn)
    tps, fps, fns = tp.astype(np.float64), fp + pfp, fn + pfn
    ss = np.maximum(2 * tps + fps + fns, 1e-12)
    f = np.where(present, 2 * tps / ss, 0.0)
    a = np.where(present, f / ss, 0.0)
    var = float((tps * (2 * (1 - f) / ss) ** 2).sum())
    if confusion is None:
        var += 2.0 * float(((fps + fns) * a * a).sum())
    else:
        off = confusion.astype(np.float64)
        np.fill_diagonal(off, 0.0)
        if pcells is not None:
            off = off + pcells
        var += float((off * (a[:, None] + a[None, :]) ** 2).sum())
    var /= k * k
    n_eff = _effective_n(float(f[present].mean()), var, int(tp.sum() + fn.sum()))
    return MacroEstimate(value, math.sqrt(var), n_eff, value + bias), method


def macro_proportion_estimate(hits: np.ndarray, totals: np.ndarray
                              ) -> MacroEstimate | None:
    """Mean of hits/totals over the classes with totals > 0 (macro precision: tp over tp+fp;
    macro recall: tp over tp+fn); the classes are binomial and independent given their
    totals, each with at least one error's worth of variance. Its interval is the normal
    one (``interval_n`` 0): Wilson at the effective n covered less here (simulated)."""
    present = totals > 0
    if not present.any():
        return None
    k, n = hits[present].astype(np.float64), totals[present].astype(np.float64)
    p = k / n
    value = float(p.mean())
    var = float((np.maximum(p * (1 - p), 1.0 / n) / n).sum()) / len(n) ** 2
    return MacroEstimate(value, math.sqrt(var), 0.0, value)
