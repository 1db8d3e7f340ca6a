"""Simulated labelled counts with a known truth, to measure how often the macro intervals
cover it (tests/quality/test_pure.py and ``python -m bench.quality_intervals``).

A case is a population: K classes in a balanced or imbalanced mix (largest class 10× the
smallest, geometric), an overall accuracy with rarer classes erring more (per-class error
from 0.5× to 1.5× the mean), and the errors spread uniformly over the other classes or
mostly (80 %) onto one neighbour. The truth is the population's macro F1 / precision /
recall over all K classes; a draw is n labels from it (multinomial over the K×K cells).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from edgeship.agent.quality import metrics

KEYS = ("f1_macro", "precision_macro", "recall_macro")


@dataclass(frozen=True)
class Case:
    classes: int
    mix: str        # "balanced" | "imbalanced"
    accuracy: float
    n: int
    errors: str     # "uniform" | "neighbour"

    @property
    def family(self) -> str:
        return f"{self.classes} classes, {self.mix}"

    def cells(self) -> np.ndarray:
        """P(truth = i, predicted = j)."""
        k = self.classes
        share = np.full(k, 1.0 / k) if self.mix == "balanced" else \
            10.0 ** (-np.arange(k) / max(k - 1, 1))
        share = share / share.sum()
        weight = np.linspace(0.5, 1.5, k)
        err = np.clip((1 - self.accuracy) * weight / (share @ weight), 0.0, 0.95)
        p = np.zeros((k, k))
        for i in range(k):
            spread = 1.0 if self.errors == "uniform" else 0.2
            p[i, :] = spread * err[i] / (k - 1)
            p[i, (i + 1) % k] += (1 - spread) * err[i]
            p[i, i] = 1 - err[i]
            p[i] *= share[i]
        return p

    @property
    def rarest_support(self) -> float:
        """Expected labels of the rarest class."""
        return self.n * float(self.cells().sum(1).min())


def truths(p: np.ndarray) -> dict[str, float]:
    d = np.diag(p)
    return {"f1_macro": float((2 * d / (p.sum(0) + p.sum(1))).mean()),
            "precision_macro": float((d / p.sum(0)).mean()),
            "recall_macro": float((d / p.sum(1)).mean())}


def counts_of(cells: np.ndarray, keep_confusion: bool = True) -> metrics.ClassCounts:
    tp = np.diag(cells).copy()
    c = metrics.ClassCounts(len(tp), tp, cells.sum(0) - tp, cells.sum(1) - tp,
                            confusion=cells.copy() if keep_confusion else None)
    return c


def grid(classes=(2, 3, 10, 30), accuracies=(0.7, 0.9, 0.99), ns=(200, 1000, 5000),
         min_rarest: float = 0.0) -> Iterator[Case]:
    """Every case of the grid whose rarest class expects at least ``min_rarest`` labels."""
    for k, mix, acc, n, errors in itertools.product(
            classes, ("balanced", "imbalanced"), accuracies, ns, ("uniform", "neighbour")):
        case = Case(k, mix, acc, n, errors)
        if case.rarest_support >= min_rarest:
            yield case


Interval = Callable[[np.ndarray], dict[str, list[float] | None]]


def product_intervals(keep_confusion: bool = True) -> Interval:
    def intervals(cells: np.ndarray) -> dict[str, list[float] | None]:
        rep = metrics.classification_report(counts_of(cells, keep_confusion))
        return {key: rep[f"{key}_ci"] for key in KEYS}
    return intervals


def thin(cells: np.ndarray) -> str:
    """Whether the report of these counts flags classes with few labels."""
    return "flagged" if metrics.thin_classes(counts_of(cells)) else "not flagged"


def coverage(cases: list[Case], draws: int, seed: int, intervals: Interval,
             group: Callable[[np.ndarray], str] | None = None
             ) -> dict[tuple[str, str], tuple[int, int]]:
    """(family, key) -> (draws whose interval held the truth, draws); with ``group`` the
    family is followed by ``group(cells)`` of each draw (e.g. whether it was flagged)."""
    rng = np.random.default_rng(seed)
    out: dict[tuple[str, str], tuple[int, int]] = {}
    for case in cases:
        p = case.cells()
        truth = truths(p)
        k = case.classes
        for cells in rng.multinomial(case.n, p.ravel(), size=draws).reshape(draws, k, k):
            got = intervals(cells)
            family = case.family if group is None else f"{case.family}, {group(cells)}"
            for key in KEYS:
                ci = got[key]
                hit = ci is not None and ci[0] <= truth[key] <= ci[1]
                a, b = out.get((family, key), (0, 0))
                out[(family, key)] = (a + hit, b + 1)
    return out
