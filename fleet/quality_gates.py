"""Rollout gates on model quality, pure: drift, the label-free estimate, and accuracy and
macro F1 measured from feedback, each compared in a way that says how sure it is.

Checked with the other gates once a wave has soaked (``fleet.rollout.evaluate_wave``);
the drift gate on every tick from the moment the wave's devices serve:

- **drift**: the wave's pooled live histograms against the release's reference profile;
  halt when the Jensen–Shannon distance of any signal exceeds ``max_drift`` with at least
  ``min_drift_samples`` samples in the wave's windows (the chance level is reported);
- **estimated accuracy**: halt when the wave's label-free estimate is lower than the
  previous version's (its devices' current windows; else the release's validation
  accuracy) by more than ``max_estimated_drop``, at one-sided ``confidence``;
- **accuracy / F1**: with at least ``min_labelled`` labelled samples of each version,
  halt when the one-sided lower confidence bound of (previous − new) exceeds
  ``max_accuracy_drop`` / ``max_f1_drop`` (0: any significant drop).

Too little data is never a failure: it is recorded with the verdict ("too few labels").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgeship.agent.quality.metrics import compare
from edgeship.fleet.quality import VersionQuality, accuracy_of, f1_of


@dataclass(frozen=True)
class QualityObservation:
    """The new version on the wave's devices (since they switched) and the previous
    version (its devices' latest windows; labelled counts from every device)."""

    new: VersionQuality
    old: VersionQuality | None


@dataclass(frozen=True)
class QualityFailure:
    gate: str
    reason: str


@dataclass(frozen=True)
class QualityLimits:
    max_drift: float | None
    min_drift_samples: int
    max_estimated_drop: float | None
    min_estimate_samples: int
    max_accuracy_drop: float | None
    max_f1_drop: float | None
    min_labelled: int
    confidence: float


def check(obs: QualityObservation | None, g: QualityLimits,
          measured: dict[str, Any]) -> QualityFailure | None:
    """The first quality gate that fails, or None; fills ``measured`` either way."""
    if obs is None:
        return None
    for gate in (_drift, _estimate, _labelled):
        failure = gate(obs, g, measured)
        if failure is not None:
            return failure
    return None


def check_drift(obs: QualityObservation | None, g: QualityLimits,
                measured: dict[str, Any]) -> QualityFailure | None:
    """The drift gate alone: a fixed threshold with a minimum sample count, so the runner
    may check it on every tick, during the soak too (the others wait for the soak)."""
    return None if obs is None else _drift(obs, g, measured)


def _drift(obs: QualityObservation, g: QualityLimits, m: dict[str, Any]
           ) -> QualityFailure | None:
    name, js, chance = obs.new.worst_drift()
    m.update(drift_js=js, drift_signal=name, drift_chance=chance,
             drift_samples=obs.new.window_samples)
    if g.max_drift is None or js is None:
        return None
    if obs.new.window_samples < g.min_drift_samples:
        m["drift_note"] = f"too few samples ({obs.new.window_samples} of " \
                          f"{g.min_drift_samples})"
        return None
    if js > g.max_drift:
        return QualityFailure("drift", f"input drift: {name} Jensen-Shannon distance "
                              f"{js:.3f} above {g.max_drift:.3f} over "
                              f"{obs.new.window_samples} samples (chance level "
                              f"{chance or 0:.3f})")
    return None


def _estimate(obs: QualityObservation, g: QualityLimits, m: dict[str, Any]
              ) -> QualityFailure | None:
    new = obs.new.estimate
    m.update(estimated_accuracy=new, estimate_samples=obs.new.estimate_n)
    if g.max_estimated_drop is None or new is None:
        return None
    if obs.new.estimate_n < g.min_estimate_samples:
        return None
    old = obs.old
    if old is not None and old.estimate is not None and \
            old.estimate_n >= g.min_estimate_samples:
        base, base_se, what = old.estimate, old.estimate_se() or 0.0, "the previous version"
    elif obs.new.reference_accuracy is not None:
        base, base_se, what = obs.new.reference_accuracy, 0.0, "its validation accuracy"
    else:
        return None
    m["estimate_baseline"] = base
    c = compare(base, base_se, new, obs.new.estimate_se() or 0.0,
                margin=g.max_estimated_drop, confidence=g.confidence)
    if c.worse:
        return QualityFailure("estimated_accuracy", f"estimated accuracy (label-free "
                              f"estimate) {new:.1%} is {c.drop * 100:.1f} points below "
                              f"{what} ({base:.1%}); limit {g.max_estimated_drop * 100:.1f}")
    return None


def _labelled(obs: QualityObservation, g: QualityLimits, m: dict[str, Any]
              ) -> QualityFailure | None:
    new_n = obs.new.labelled.n if obs.new.labelled is not None else 0
    old_n = obs.old.labelled.n if obs.old is not None and obs.old.labelled is not None else 0
    m.update(labelled_new=new_n, labelled_old=old_n)
    if min(new_n, old_n) < g.min_labelled:
        if g.max_accuracy_drop is not None or g.max_f1_drop is not None:
            m["labelled_note"] = f"too few labels to compare (new {new_n}, previous " \
                                 f"{old_n}; {g.min_labelled} each needed)"
        return None
    assert obs.old is not None
    checks = (("accuracy", g.max_accuracy_drop, accuracy_of), ("f1", g.max_f1_drop, f1_of))
    for gate, limit, metric in checks:
        old, old_se = metric(obs.old.labelled)
        new, new_se = metric(obs.new.labelled)
        if old is None or new is None:
            continue
        m[f"{gate}_new"], m[f"{gate}_old"] = new, old
        if limit is None:
            continue
        c = compare(old, old_se or 0.0, new, new_se or 0.0, margin=limit,
                    confidence=g.confidence)
        if c.worse:
            name = "accuracy" if gate == "accuracy" else "macro F1"
            return QualityFailure(gate, f"{name} from feedback {new:.3f} below the previous "
                                  f"version's {old:.3f} ({new_n} vs {old_n} labelled "
                                  f"samples; the drop's {g.confidence:.0%} lower bound "
                                  f"{c.bound:.3f} exceeds {limit:.3f})")
    return None

