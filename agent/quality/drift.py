"""Drift scores and the sliding window of live histograms (pure).

The drift score of a signal is the **Jensen–Shannon distance** (base 2, the square root of
the JS divergence: 0 = same histogram, 1 = disjoint) between the live window's histogram and
the reference profile's, over the profile's bins (equal-mass quantiles of the validation
set). Why JS and not the others:

- PSI and KL are infinite when a live bin is empty where the reference is not (or the other
  way round) and need a smoothing constant that changes the score; JS is finite, symmetric
  and bounded, so one threshold fits every signal;
- the Wasserstein distance is in the units of the signal (a mean pixel value, an entropy),
  so each signal would need its own threshold;
- with a few hundred to a few thousand samples per window, binned JS is what Evidently
  uses above 1,000 rows; PSI is reported beside it for people used to its 0.1/0.25 rules.

A finite sample drifts by chance: :func:`chance_js` is the distance expected with no drift
for n live and m reference samples, shown next to every score.

The window is a ring of ``blocks`` histograms of ``block_samples`` samples each: memory is
constant (blocks × signals × bins counters) and the window covers the newest
(blocks-1) × block_samples to blocks × block_samples samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

#: smoothing share for PSI (empty bins); JS needs none
PSI_EPSILON = 1e-4


def js_distance(counts: np.ndarray, ref: np.ndarray) -> float | None:
    """Jensen–Shannon distance (base 2) between a histogram of counts and reference shares;
    None with no samples."""
    total = float(counts.sum())
    if total <= 0:
        return None
    p = counts / total
    q = ref
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.where(p > 0, p * np.log2(p / m), 0.0).sum()
        kl_q = np.where(q > 0, q * np.log2(q / m), 0.0).sum()
    return float(math.sqrt(max(0.0, (kl_p + kl_q) / 2)))


def psi(counts: np.ndarray, ref: np.ndarray, epsilon: float = PSI_EPSILON) -> float | None:
    """Population stability index (with ``epsilon`` for empty bins); None with no samples."""
    total = float(counts.sum())
    if total <= 0:
        return None
    p = np.maximum(counts / total, epsilon)
    q = np.maximum(ref, epsilon)
    return float(((p - q) * np.log(p / q)).sum())


def chance_js(bins: int, n: int, m: int) -> float | None:
    """JS distance expected from sampling alone, with no drift: n live samples against a
    reference histogram of m samples, over ``bins`` bins (the divergence is about
    (bins-1)/8 * (1/n + 1/m) nats for nearby histograms)."""
    if n <= 0 or bins < 2:
        return None
    inv = 1.0 / n + (1.0 / m if m > 0 else 0.0)
    return math.sqrt((bins - 1) / 8.0 * inv / math.log(2))


def bin_indices(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of each value: i means edges[i-1] <= v < edges[i] (NaN goes to the last bin)."""
    return np.searchsorted(edges, values, side="right")


@dataclass(frozen=True)
class WindowSettings:
    blocks: int = 8
    block_samples: int = 256

    @property
    def samples(self) -> int:
        return self.blocks * self.block_samples


class SlidingWindow:
    """Histogram counts per signal over the newest samples, plus what the label-free
    estimates need: the count of samples whose score is above the ATC threshold and the sum
    of the confidences (DoC). Not thread-safe: the monitor holds its fold lock around
    :meth:`add` and :meth:`totals`."""

    def __init__(self, bins: Sequence[int], settings: WindowSettings = WindowSettings()
                 ) -> None:
        self.settings = settings
        self.bins = list(bins)
        self.width = max(self.bins, default=1)
        self.offsets = np.arange(len(self.bins), dtype=np.intp) * self.width  # bincount: intp
        shape = (settings.blocks, max(1, len(self.bins)) * self.width)
        self._counts = np.zeros(shape, dtype=np.int64)
        self._n = np.zeros(settings.blocks, dtype=np.int64)
        self._above = np.zeros(settings.blocks, dtype=np.int64)
        self._confidence = np.zeros(settings.blocks, dtype=np.float64)
        self._block = 0
        self.total = 0  # samples ever added

    def add(self, bin_matrix: np.ndarray, above: np.ndarray | None,
            confidence: np.ndarray | None = None) -> None:
        """``bin_matrix``: (n, signals) bin indices; ``above``: (n,) bools or None;
        ``confidence``: (n,) max class probabilities or None."""
        n = bin_matrix.shape[0]
        start = 0
        while start < n:
            room = self.settings.block_samples - int(self._n[self._block])
            if room == 0:
                self._advance()
                continue
            stop = min(n, start + room)
            self._add_rows(bin_matrix[start:stop], None if above is None else above[start:stop],
                           None if confidence is None else confidence[start:stop])
            start = stop

    def _add_rows(self, rows: np.ndarray, above: np.ndarray | None,
                  confidence: np.ndarray | None) -> None:
        b = self._block
        if rows.shape[1]:
            flat = (rows + self.offsets).ravel()
            self._counts[b] += np.bincount(flat, minlength=self._counts.shape[1])
        self._n[b] += rows.shape[0]
        if above is not None:
            self._above[b] += int(np.count_nonzero(above))
        if confidence is not None:
            self._confidence[b] += float(confidence.sum())
        self.total += rows.shape[0]

    def _advance(self) -> None:
        self._block = (self._block + 1) % self.settings.blocks
        self._counts[self._block] = 0
        self._n[self._block] = 0
        self._above[self._block] = 0
        self._confidence[self._block] = 0.0

    def totals(self) -> tuple[int, list[np.ndarray], int]:
        """(samples in the window, counts per signal, samples above the threshold)."""
        summed = self._counts.sum(axis=0)
        per = [summed[i * self.width:i * self.width + b] for i, b in enumerate(self.bins)]
        return int(self._n.sum()), per, int(self._above.sum())

    @property
    def confidence_sum(self) -> float:
        """Sum of the confidences over the window's samples (0 when none were given)."""
        return float(self._confidence.sum())

    @property
    def nbytes(self) -> int:
        return (self._counts.nbytes + self._n.nbytes + self._above.nbytes
                + self._confidence.nbytes)
