"""How often the macro F1 / precision / recall 95 % intervals cover the truth, simulated:
the agent's intervals (confusion counts kept, and the bound used without them) beside the
ones before (normal intervals; F1 with per-class counts taken as independent Poisson).

    python -m bench.quality_intervals [--draws 200] [--min-rarest 0] [--by-thin]

``--by-thin`` splits each family into the draws whose report flags classes with fewer than
8 labels (``thin_classes``) and the rest.

Cases: tests/support/intervals.py (2, 3, 10, 30 classes, balanced and 10:1 imbalanced,
accuracy 0.7 / 0.9 / 0.99, 200 / 1,000 / 5,000 labels, errors uniform or onto a neighbour).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from edgeship.agent.quality.metrics import z_value
from tests.support import intervals as iv


def _before(cells: np.ndarray) -> dict[str, list[float] | None]:
    """The intervals as they were: normal, F1 from independent Poisson per-class counts."""
    tp = np.diag(cells).astype(np.float64)
    fp, fn = cells.sum(0) - tp, cells.sum(1) - tp
    z = z_value(0.95)

    def normal(value: float, se: float) -> list[float]:
        return [max(0.0, value - z * se), min(1.0, value + z * se)]

    present = (tp + fp + fn) > 0
    a, b = 2 * tp[present], (fp + fn)[present]
    var = (b * b * 2 * a + a * a * b) / np.maximum(a + b, 1.0) ** 4
    out = {"f1_macro": normal(float((a / (a + b)).mean()),
                              math.sqrt(var.sum()) / int(present.sum()))}
    for key, totals in (("precision_macro", tp + fp), ("recall_macro", tp + fn)):
        n = totals[totals > 0]
        p = tp[totals > 0] / n
        se = math.sqrt(float((np.maximum(p * (1 - p), 1 / n) / n).sum())) / len(n)
        out[key] = normal(float(p.mean()), se)
    return out


def _order(item: tuple[str, str]) -> tuple[int, str, int]:
    family, key = item
    return int(family.split()[0]), family, iv.KEYS.index(key)


def _print_totals(results: dict[str, dict[tuple[str, str], tuple[int, int]]]) -> None:
    """Coverage over every family, flagged draws against the rest."""
    for flag in ("flagged", "not flagged"):
        for key in iv.KEYS:
            parts = []
            for name, res in results.items():
                a, b = (sum(x) for x in zip(*(v for (f, k), v in res.items()
                                              if k == key and f.endswith(", " + flag))))
                parts.append(f"{name} {a / b:.3f}")
            print(f"all families, {flag} ({b} draws), {key}: " + ", ".join(parts))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=200, help="draws per case")
    ap.add_argument("--min-rarest", type=float, default=0.0,
                    help="only cases whose rarest class expects this many labels")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--by-thin", action="store_true",
                    help="split each family by whether the report flags thin classes")
    args = ap.parse_args(argv)
    group = iv.thin if args.by_thin else None
    cases = list(iv.grid(min_rarest=args.min_rarest))
    columns = {"before": _before, "after": iv.product_intervals(True),
               "after, no confusion": iv.product_intervals(False)}
    results, cost = {}, {}
    for name, fn in columns.items():
        t = time.perf_counter()
        results[name] = iv.coverage(cases, args.draws, args.seed, fn, group)
        cost[name] = (time.perf_counter() - t) / (len(cases) * args.draws) * 1e3
    print(f"{len(cases)} cases x {args.draws} draws, seed {args.seed}; "
          "share of draws whose interval held the truth (nominal 95 %)")
    print("| family | metric | draws | " + " | ".join(columns) + " |")
    print("|---|---|---|" + "---|" * len(columns))
    for family, key in sorted(results["after"], key=_order):
        cells = [f"{a / b:.3f}" for a, b in (results[name][(family, key)] for name in columns)]
        print(f"| {family} | {key} | {results['after'][(family, key)][1]} | " +
              " | ".join(cells) + " |")
    if args.by_thin:
        _print_totals(results)
    print("ms per report (all three intervals, incl. the simulation's draw): " +
          ", ".join(f"{k} {v:.2f}" for k, v in cost.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
