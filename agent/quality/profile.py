"""The reference profile a release carries (``manifest.json`` → ``"profile"``), parsed.

Written by the converter from its validation set (``converter/profile.py``), read here on
the device. It names the signals (``agent.quality.features``) and, per signal, the bin
edges and the share of validation samples in each bin; for a classifier, which output holds
the scores and how they read, and what the label-free accuracy estimate needs (per variant,
since an int8 variant's confidences differ a little from fp32's): the validation accuracy,
the mean confidence (difference of confidences, the estimate) and the threshold of average
thresholded confidence (reported beside it).

JSON layout (``format`` 1)::

    {"format": 1, "samples": 450, "task": "classification",
     "score": {"output": "logits", "kind": "logits", "classes": 10},
     "signals": [{"name": "x:mean", "stat": "mean", "tensor": "x",
                  "edges": [0.21, ...], "ref": [0.1, ...]}, ...],
     "estimate": {"method": "atc", "score": "confidence", "threshold": 0.67,
                  "accuracy": 0.982, "mean_confidence": 0.97,
                  "variants": {"onnx-int8": {"threshold": ..., "accuracy": ...,
                                             "mean_confidence": ...}}}}

``mean_confidence`` is optional (added later in format 1; readers that predate it ignore
it): with it the estimate is the **difference of confidences** (DoC, Guillory et al.,
ICCV 2021): validation accuracy + live mean confidence - validation mean confidence, and
ATC is reported beside it; without it (older bundles) the estimate is ATC, as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from edgeship.agent.errors import BundleError
from edgeship.agent.quality.features import (INPUT_STATS, OUTPUT_STATS, SCORE_KINDS,
                                             SignalSpec)

PROFILE_FORMAT = 1
MAX_SIGNALS = 128
MAX_BINS = 64
ATC_SCORES = ("confidence", "negative_entropy")
#: the label-free estimates an agent reports (``estimate.method``), in words
ESTIMATE_METHODS = {"doc": "difference of confidences", "atc": "average thresholded confidence"}


@dataclass(frozen=True)
class SignalRef:
    """A signal with its reference histogram: ``edges`` (ascending, len B-1) split the
    line into B bins; ``ref`` is the share of reference samples in each."""

    spec: SignalSpec
    edges: np.ndarray
    ref: np.ndarray

    @property
    def bins(self) -> int:
        return len(self.ref)


@dataclass(frozen=True)
class Estimator:
    """The label-free accuracy estimate of one variant.

    Average thresholded confidence (ATC): the share of samples whose ``score`` exceeds
    ``threshold`` (chosen so that on the validation set that share equals the measured
    ``accuracy``). Difference of confidences (DoC, when ``mean_confidence`` is known):
    ``accuracy`` + the live mean max-probability - ``mean_confidence``, the validation one."""

    score: str
    threshold: float
    accuracy: float
    mean_confidence: float | None = None

    @property
    def method(self) -> str:
        return "atc" if self.mean_confidence is None else "doc"

    def doc_accuracy(self, confidence_sum: float, n: int) -> float | None:
        """DoC's estimate from the window's confidence sum over ``n`` samples, in [0, 1]."""
        if self.mean_confidence is None or n <= 0:
            return None
        est = self.accuracy + confidence_sum / n - self.mean_confidence
        return min(1.0, max(0.0, est))


@dataclass(frozen=True)
class ScorePlan:
    """Which output holds a classifier's scores and how they read (``kind`` None: decide
    from the values; only a single-column output needs to)."""

    output: str
    kind: str | None
    classes: int


@dataclass(frozen=True)
class Profile:
    samples: int
    task: str
    score: ScorePlan | None
    signals: tuple[SignalRef, ...]
    estimators: Mapping[str, Estimator] = field(default_factory=dict)  # "" = default

    def estimator(self, variant: str) -> Estimator | None:
        return self.estimators.get(variant) or self.estimators.get("")

    @property
    def input_names(self) -> set[str]:
        return {s.spec.tensor for s in self.signals if s.spec.is_input}


def parse_profile(raw: Any) -> Profile:
    """A checked :class:`Profile`, or BundleError naming what is wrong."""
    try:
        return _parse(raw)
    except BundleError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"reference profile invalid: {e!r}") from e


def _parse(raw: Any) -> Profile:
    if not isinstance(raw, dict) or raw.get("format") != PROFILE_FORMAT:
        raise BundleError(f"reference profile: unknown format "
                          f"{raw.get('format') if isinstance(raw, dict) else raw!r}")
    signals = raw.get("signals", [])
    if not isinstance(signals, list) or len(signals) > MAX_SIGNALS:
        raise BundleError(f"reference profile: 'signals' must be a list of at most "
                          f"{MAX_SIGNALS}")
    score = _score(raw.get("score"))
    refs = tuple(_signal(s) for s in signals)
    names = [r.spec.name for r in refs]
    if len(set(names)) != len(names):
        raise BundleError("reference profile repeats a signal name")
    samples = int(raw.get("samples", 0))
    if samples < 0:
        raise BundleError("reference profile: 'samples' must be >= 0")
    return Profile(samples=samples, task=str(raw.get("task", "")), score=score,
                   signals=refs, estimators=_estimators(raw.get("estimate"), score))


def _score(raw: Any) -> ScorePlan | None:
    if raw is None:
        return None
    kind = raw.get("kind")
    if kind not in SCORE_KINDS:
        raise BundleError(f"reference profile: score kind {kind!r} not one of {SCORE_KINDS}")
    classes = int(raw["classes"])
    if classes < 1:
        raise BundleError("reference profile: score 'classes' must be >= 1")
    return ScorePlan(output=str(raw["output"]), kind=kind, classes=classes)


def _signal(raw: Any) -> SignalRef:
    stat = raw["stat"]
    if stat not in INPUT_STATS + OUTPUT_STATS:
        raise BundleError(f"reference profile: unknown signal stat {stat!r}")
    spec = SignalSpec(name=str(raw["name"])[:128], stat=stat, tensor=str(raw["tensor"]),
                      axis=int(raw.get("axis", -1)), channel=int(raw.get("channel", -1)))
    if stat == "channel_mean" and (spec.axis not in (0, 2) or spec.channel < 0):
        raise BundleError(f"reference profile: signal {spec.name!r} needs axis 0|2 and "
                          "a channel")
    edges = np.asarray(raw["edges"], dtype=np.float64).reshape(-1)
    ref = np.asarray(raw["ref"], dtype=np.float64).reshape(-1)
    if not 1 <= len(ref) <= MAX_BINS or len(edges) != len(ref) - 1:
        raise BundleError(f"reference profile: signal {spec.name!r} needs 1..{MAX_BINS} "
                          "bins and one edge fewer than bins")
    if not np.all(np.isfinite(edges)) or np.any(np.diff(edges) <= 0):
        raise BundleError(f"reference profile: signal {spec.name!r} edges must be finite "
                          "and strictly increasing")
    if np.any(ref < 0) or not math.isclose(float(ref.sum()), 1.0, abs_tol=1e-3):
        raise BundleError(f"reference profile: signal {spec.name!r} shares must be >= 0 "
                          "and sum to 1")
    return SignalRef(spec, edges, ref / ref.sum())


def _estimators(raw: Any, score: ScorePlan | None) -> dict[str, Estimator]:
    if raw is None:
        return {}
    if score is None or raw.get("method") != "atc" or raw.get("score") not in ATC_SCORES:
        raise BundleError("reference profile: estimate needs a score output, method 'atc' "
                          f"and a score in {ATC_SCORES}")
    found = {"": _estimator(raw["score"], raw)}
    for variant, doc in dict(raw.get("variants", {})).items():
        found[str(variant)] = _estimator(raw["score"], doc)
    return found


def _estimator(score: str, raw: Mapping[str, Any]) -> Estimator:
    threshold, accuracy = float(raw["threshold"]), float(raw["accuracy"])
    if not math.isfinite(threshold) or not 0.0 <= accuracy <= 1.0:
        raise BundleError("reference profile: estimate threshold must be finite and "
                          "accuracy in [0, 1]")
    conf = raw.get("mean_confidence")
    if conf is not None and not 0.0 < float(conf) <= 1.0:
        raise BundleError("reference profile: estimate mean_confidence must be in (0, 1]")
    return Estimator(score, threshold, accuracy,
                     None if conf is None else float(conf))


def score_plan(task: str, outputs: Any, labels: tuple[str, ...]) -> ScorePlan | None:
    """Without a profile: a classifier's first output of one row of scores per sample
    (``outputs``: the manifest's output specs). None for other tasks."""
    if task != "classification" or not outputs:
        return None
    for spec in outputs:
        shape = tuple(spec.shape)
        if len(shape) == 2 and shape[1] is not None and (not labels or
                                                         shape[1] in (len(labels), 1)):
            kind = "logits" if shape[1] > 1 else None
            return ScorePlan(spec.name, kind, max(int(shape[1]), len(labels) or 1))
    spec = outputs[0]
    return ScorePlan(spec.name, "logits", len(labels) or 0)
