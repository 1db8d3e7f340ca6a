"""The reference profile a release carries: what the validation set looked like.

For each signal (``agent.quality.features``: per-input mean, std, share of zeros,
per-channel means; the classifier's confidence, entropy and predicted class; a regression's
predicted value) the profile keeps bin edges and the share of validation samples in each
bin; for a classifier with labels, per variant, what the label-free accuracy estimate
needs: the validation accuracy and mean confidence (difference of confidences, Guillory et
al., ICCV 2021: the estimate) and the threshold of average thresholded confidence (Garg et
al., ICLR 2022: reported beside it, and the estimate of agents older than DoC). The agent
computes the same signals over live traffic and compares (``agent.quality.drift``). The
profile is a few kilobytes of JSON inside ``manifest.json``; no sample is stored.

Bins: ``bins`` equal-mass bins from the validation quantiles, plus one below the smallest
and one above the largest validation value (their reference share is zero, so live values
outside the validated range weigh heavily). A signal constant on the validation set gets a
bin just below and just above the constant.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import numpy as np

from edgeship.agent.manifest import TensorSpec
from edgeship.agent.quality.drift import bin_indices
from edgeship.agent.quality.features import (SignalSpec, atc_scores, class_probabilities,
                                             input_columns, input_signals, output_columns,
                                             output_signals, score_kind)
from edgeship.agent.quality.profile import PROFILE_FORMAT, parse_profile

logger = logging.getLogger(__name__)

DEFAULT_BINS = 10
#: ATC's score: max probability tracked accuracy better than negative entropy under
#: covariate shift of the digits (scripts/bench-quality prints both)
DEFAULT_ATC_SCORE = "confidence"
MAX_PROFILE_SAMPLES = 5000


def quantile_edges(values: np.ndarray, bins: int = DEFAULT_BINS) -> np.ndarray:
    """Ascending unique edges: the validation range's ends and ``bins``-quantiles."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return np.array([0.0])
    lo, hi = float(v.min()), float(v.max())
    if lo == hi:
        return np.array([lo, np.nextafter(lo, np.inf)])
    inner = np.quantile(v, np.linspace(0, 1, bins + 1)[1:-1])
    edges = np.array([lo, *inner, np.nextafter(hi, np.inf)])
    return np.unique(edges)


def class_edges(classes: int) -> np.ndarray:
    return np.arange(classes - 1, dtype=np.float64) + 0.5


def _signal_doc(spec: SignalSpec, values: np.ndarray, edges: np.ndarray) -> dict[str, Any]:
    counts = np.bincount(bin_indices(values, edges), minlength=len(edges) + 1)
    return {**spec.to_dict(), "edges": [float(e) for e in edges],
            "ref": [round(float(c) / max(1, values.size), 6) for c in counts]}


def _score_output(task: str, outputs: Sequence[np.ndarray], labels: Sequence[str]) -> int:
    """Index of the output a classifier's scores are in (rows of K scores per sample)."""
    if task == "classification":
        for i, out in enumerate(outputs):
            if out.ndim == 2 and (not labels or out.shape[1] in (len(labels), 1)):
                return i
    return 0


def build_profile(inputs: Mapping[str, np.ndarray], outputs: Sequence[np.ndarray], *,
                  input_specs: Sequence[TensorSpec], output_specs: Sequence[TensorSpec],
                  task: str, labels: Sequence[str] = (), y: np.ndarray | None = None,
                  variant_outputs: Mapping[str, np.ndarray] | None = None,
                  bins: int = DEFAULT_BINS, atc_score: str = DEFAULT_ATC_SCORE
                  ) -> dict[str, Any]:
    """The profile of validation ``inputs`` (name → (N, ...) batch) and the model's
    ``outputs`` on them (in ``output_specs`` order). ``y``: the labels, for the estimate's
    threshold; ``variant_outputs``: each variant's score output on the same inputs (its
    own threshold)."""
    n = len(next(iter(inputs.values())))
    signals = _input_signal_docs(inputs, input_specs, bins)
    idx = _score_output(task, outputs, labels)
    scores = np.asarray(outputs[idx])
    name = output_specs[idx].name if idx < len(output_specs) else f"output{idx}"
    doc: dict[str, Any] = {"format": PROFILE_FORMAT, "samples": int(n), "task": task}
    kind = None
    if task == "classification" and scores.ndim == 2:
        kind = score_kind(scores)
        doc["score"] = {"output": name, "kind": kind, "classes": int(scores.shape[1])}
    classes = max(2, scores.shape[1]) if kind is not None else 0
    specs = output_signals(task if kind is not None or task != "classification"
                           else "generic", name, scores.shape[1] if scores.ndim == 2 else 0)
    probs = class_probabilities(scores, kind) if kind is not None else None
    columns = output_columns(scores, specs, probs)
    for s, col in zip(specs, columns):
        edges = class_edges(classes) if s.stat == "class" else quantile_edges(col, bins)
        signals.append(_signal_doc(s, col, edges))
    doc["signals"] = signals
    if probs is not None and y is not None:
        doc["estimate"] = _estimate(probs, np.asarray(y), kind, atc_score, variant_outputs)
    parse_profile(doc)  # the device's parser must accept it
    return doc


def _input_signal_docs(inputs: Mapping[str, np.ndarray], input_specs: Sequence[TensorSpec],
                       bins: int) -> list[dict[str, Any]]:
    docs = []
    for spec in input_specs:
        if spec.name not in inputs:
            continue
        batch = np.asarray(inputs[spec.name])
        specs = input_signals(spec.name, str(batch.dtype), batch.shape[1:])
        for s, col in zip(specs, input_columns(batch, specs)):
            docs.append(_signal_doc(s, col, quantile_edges(col, bins)))
    return docs


def atc_threshold(scores: np.ndarray, correct: np.ndarray) -> tuple[float, float]:
    """(threshold, accuracy): the share of ``scores`` above the threshold equals the
    accuracy measured on these samples."""
    n = scores.size
    acc = float(correct.mean())
    above = int(round(acc * n))
    s = np.sort(scores)
    if above >= n:
        return float(s[0]) - 1e-9 - 1e-9 * abs(float(s[0])), acc
    if above <= 0:
        return float(s[-1]), acc
    return float((s[n - above - 1] + s[n - above]) / 2), acc


def _estimate(probs: np.ndarray, y: np.ndarray, kind: str | None, score: str,
              variant_outputs: Mapping[str, np.ndarray] | None) -> dict[str, Any]:
    def one(p: np.ndarray) -> dict[str, float]:
        t, acc = atc_threshold(atc_scores(p, score), p.argmax(axis=1) == y)
        return {"threshold": t, "accuracy": acc,
                "mean_confidence": float(p.max(axis=1).mean())}

    doc: dict[str, Any] = {"method": "atc", "score": score, **one(probs)}
    variants = {vid: one(class_probabilities(np.asarray(out), kind or "logits"))
                for vid, out in (variant_outputs or {}).items()}
    if variants:
        doc["variants"] = variants
    return doc


def bundle_profile(variant_outputs: Mapping[str, Sequence[np.ndarray]],
                   inputs: Mapping[str, np.ndarray], y: np.ndarray | None, *,
                   input_specs: Sequence[TensorSpec], output_specs: Sequence[TensorSpec],
                   task: str, labels: Sequence[str] = ()) -> dict[str, Any]:
    """The bundle writer's call: the validation inputs (name → rows) and each variant's
    outputs on them (in ``output_specs`` order); the first variant's are the reference,
    every variant gets its own estimate threshold on the score output."""
    first = list(next(iter(variant_outputs.values())))
    idx = _score_output(task, first, labels)
    return build_profile(inputs, first, input_specs=input_specs, output_specs=output_specs,
                         task=task, labels=labels, y=y,
                         variant_outputs={vid: outs[idx]
                                          for vid, outs in variant_outputs.items()})
