"""Signals: per-sample summaries of a model's inputs and outputs.

A signal turns each sample of a batch into one number: an input's mean, standard deviation,
share of zeros or per-channel mean; the model's confidence, normalised output entropy or
predicted class; a regression's predicted value. The converter computes them over its
validation set (the reference profile) and the agent over live traffic with this module,
so both sides always mean the same thing. Nothing here keeps raw data.

Cost bounds: a sample larger than ``MAX_SAMPLE_ELEMENTS`` values is read at a fixed odd
stride (the same on both sides), so a 3x320x320 image costs about what a 4,096-value one
does; at most ``MAX_CHANNELS`` per-channel means per input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

MAX_SAMPLE_ELEMENTS = 4096
MAX_CHANNELS = 8
#: predicted-class histograms for up to this many classes (else confidence/entropy only)
MAX_CLASS_BINS = 64

INPUT_STATS = ("mean", "std", "zeros", "channel_mean")
OUTPUT_STATS = ("confidence", "entropy", "class", "value", "out_mean", "out_std")
#: how a classifier's score output reads: softmax over logits, already probabilities, or a
#: single column (sigmoid of a logit, or a probability) for a binary classifier
SCORE_KINDS = ("logits", "probabilities", "sigmoid_logit", "sigmoid_probability")


@dataclass(frozen=True)
class SignalSpec:
    """What one signal measures; ``tensor`` names the input or output it reads."""

    name: str
    stat: str
    tensor: str
    axis: int = -1     # channel_mean: the channel axis within a sample (batch axis excluded)
    channel: int = -1  # channel_mean: which channel

    @property
    def is_input(self) -> bool:
        return self.stat in INPUT_STATS

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name, "stat": self.stat, "tensor": self.tensor}
        if self.stat == "channel_mean":
            doc.update(axis=self.axis, channel=self.channel)
        return doc


def channel_axis(sample_shape: Sequence[int | None]) -> int | None:
    """The channel axis of an image-like sample (C,H,W or H,W,C with 2..MAX_CHANNELS
    channels, fewer than either spatial size), else None."""
    if len(sample_shape) != 3 or any(d is None for d in sample_shape):
        return None
    a, b, c = (int(d) for d in sample_shape)  # type: ignore[arg-type]
    if 1 < a <= MAX_CHANNELS and a < min(b, c):
        return 0
    if 1 < c <= MAX_CHANNELS and c < min(a, b):
        return 2
    return None


def input_signals(name: str, dtype: str, sample_shape: Sequence[int | None]
                  ) -> list[SignalSpec]:
    """The signals of one input: mean and std (floats), mean and share of zeros (integers,
    e.g. token ids with padding), mean (booleans); per-channel means for images."""
    kind = np.dtype(dtype).kind
    if kind == "b":
        return [SignalSpec(f"{name}:mean", "mean", name)]
    if kind in "iu":
        return [SignalSpec(f"{name}:mean", "mean", name),
                SignalSpec(f"{name}:zeros", "zeros", name)]
    specs = [SignalSpec(f"{name}:mean", "mean", name), SignalSpec(f"{name}:std", "std", name)]
    axis = channel_axis(sample_shape)
    if axis is not None:
        count = int(sample_shape[axis])  # type: ignore[arg-type]
        specs += [SignalSpec(f"{name}:channel_mean[{c}]", "channel_mean", name, axis, c)
                  for c in range(count)]
    return specs


def output_signals(task: str, output: str, classes: int) -> list[SignalSpec]:
    """Classifiers: confidence, normalised entropy, predicted class (up to
    ``MAX_CLASS_BINS`` classes); regression: the predicted value; anything else (embeddings,
    detections): mean and std of the output."""
    if task == "classification":
        specs = [SignalSpec("confidence", "confidence", output),
                 SignalSpec("entropy", "entropy", output)]
        if 2 <= classes <= MAX_CLASS_BINS or classes == 1:
            specs.append(SignalSpec("class", "class", output))
        return specs
    if task == "regression":
        return [SignalSpec("prediction", "value", output)]
    return [SignalSpec(f"{output}:mean", "out_mean", output),
            SignalSpec(f"{output}:std", "out_std", output)]


# --- computing them ---------------------------------------------------------------------

def _rows(batch: np.ndarray) -> np.ndarray:
    """(n, m) view of a batch, a strided subset of each sample when it is large."""
    n = batch.shape[0] if batch.ndim else 1
    flat = batch.reshape(n, -1)
    m = flat.shape[1]
    if m > MAX_SAMPLE_ELEMENTS:
        step = math.ceil(m / MAX_SAMPLE_ELEMENTS) | 1
        flat = flat[:, ::step]
    return flat


def _channel_means(batch: np.ndarray, axis: int) -> np.ndarray:
    """(n, C) per-channel means of an (n, C, H, W) or (n, H, W, C) batch."""
    n, count = batch.shape[0], batch.shape[axis + 1]
    if axis == 0:
        per = batch.reshape(n, count, -1)
        step = math.ceil(per.shape[2] * count / MAX_SAMPLE_ELEMENTS) | 1
        return per[:, :, ::step].mean(axis=2, dtype=np.float64)
    per = batch.reshape(n, -1, count)
    step = math.ceil(per.shape[1] * count / MAX_SAMPLE_ELEMENTS) | 1
    return per[:, ::step, :].mean(axis=1, dtype=np.float64)


def input_columns(batch: np.ndarray, specs: Sequence[SignalSpec]) -> list[np.ndarray]:
    """One float64 array of per-sample values for each spec (all specs read ``batch``)."""
    rows = _rows(batch)
    if rows.dtype.kind not in "fc":
        rows = rows.astype(np.float64)
    mean = rows.mean(axis=1, dtype=np.float64)
    out: list[np.ndarray] = []
    channels: np.ndarray | None = None
    for spec in specs:
        if spec.stat == "mean":
            out.append(mean)
        elif spec.stat == "std":
            sq = np.einsum("ij,ij->i", rows, rows, dtype=np.float64) / max(1, rows.shape[1])
            out.append(np.sqrt(np.maximum(sq - mean * mean, 0.0)))
        elif spec.stat == "zeros":
            out.append(np.count_nonzero(rows == 0, axis=1) / max(1, rows.shape[1]))
        else:  # channel_mean
            if channels is None:
                channels = _channel_means(batch, spec.axis)
            out.append(channels[:, spec.channel])
    return out


def class_probabilities(scores: np.ndarray, kind: str) -> np.ndarray:
    """(n, K) class probabilities in float64 (K = 2 for a single-column binary output)."""
    s = scores.reshape(scores.shape[0], -1).astype(np.float64)
    if kind == "logits":
        s = s - s.max(axis=1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=1, keepdims=True)
        return s
    if kind == "probabilities":
        return np.clip(s, 0.0, 1.0)
    p = 1.0 / (1.0 + np.exp(-s[:, :1])) if kind == "sigmoid_logit" else np.clip(s[:, :1], 0, 1)
    return np.concatenate([1.0 - p, p], axis=1)


def entropy(probs: np.ndarray) -> np.ndarray:
    """Per-sample entropy divided by log K: 0 certain, 1 uniform."""
    k = probs.shape[1]
    logs = np.log(np.maximum(probs, 1e-300))
    h = -np.einsum("ij,ij->i", probs, logs)
    return h / math.log(k) if k > 1 else h


def score_kind(scores: np.ndarray) -> str:
    """How a classifier's outputs read, from a batch of them (the converter asks once)."""
    s = scores.reshape(scores.shape[0], -1).astype(np.float64)
    in_unit = bool(s.size) and float(s.min()) >= 0.0 and float(s.max()) <= 1.0
    if s.shape[1] == 1:
        return "sigmoid_probability" if in_unit else "sigmoid_logit"
    if in_unit and np.allclose(s.sum(axis=1), 1.0, atol=1e-3):
        return "probabilities"
    return "logits"


def output_columns(scores: np.ndarray, specs: Sequence[SignalSpec],
                   probs: np.ndarray | None) -> list[np.ndarray]:
    """Per-sample values for each output spec; ``probs``: a classifier's class
    probabilities (:func:`class_probabilities`), None for other tasks."""
    out: list[np.ndarray] = []
    for spec in specs:
        if spec.stat == "confidence":
            out.append(probs.max(axis=1))  # type: ignore[union-attr]
        elif spec.stat == "entropy":
            out.append(entropy(probs))  # type: ignore[arg-type]
        elif spec.stat == "class":
            out.append(probs.argmax(axis=1).astype(np.float64))  # type: ignore[union-attr]
        elif spec.stat == "value":
            out.append(_rows(scores)[:, 0].astype(np.float64))
        else:
            rows = _rows(scores).astype(np.float64)
            out.append(rows.mean(axis=1) if spec.stat == "out_mean" else rows.std(axis=1))
    return out


def atc_scores(probs: np.ndarray, score: str) -> np.ndarray:
    """The score average-thresholded-confidence thresholds: max probability
    (``confidence``) or negative normalised entropy (``negative_entropy``)."""
    return probs.max(axis=1) if score == "confidence" else -entropy(probs)


def by_name(specs: Sequence[SignalSpec], tensors: Mapping[str, Any]) -> dict[str, list[int]]:
    """Indices of the specs reading each tensor name present in ``tensors``."""
    found: dict[str, list[int]] = {}
    for i, spec in enumerate(specs):
        if spec.tensor in tensors:
            found.setdefault(spec.tensor, []).append(i)
    return found
