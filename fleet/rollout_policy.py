"""Rollout policy, as a person writes it: the waves, the gates a wave must pass and what
to do when one fails. Frozen, validated settings that round-trip through JSON; every bad
value is refused with the key at fault. :mod:`fleet.rollout` (the state machine and the
verdicts) re-exports these names.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from edgeship.agent.errors import ConfigError  # bad input: exit 2
from edgeship.fleet.quality_gates import QualityLimits


@dataclass(frozen=True)
class Gates:
    min_install_success: float = 0.95      # fraction of a wave's devices serving the new one
    max_error_rate: float = 0.02           # inference errors / requests on the new version
    max_latency_ratio: float = 1.5         # new p50 / old p50, median over paired devices
    min_shadow_agreement: float | None = None  # set when the release asks for shadow testing
    min_requests: int = 20                 # served on the new version in the wave to judge
    # model quality (fleet.quality_gates; None turns one off): input drift as the largest
    # JS distance of a signal, the label-free estimate's drop, and the drops of accuracy
    # and macro F1 measured from feedback (lower confidence bound above the margin)
    max_drift: float | None = 0.25
    min_drift_samples: int = 200
    max_estimated_drop: float | None = 0.05
    min_estimate_samples: int = 200
    max_accuracy_drop: float | None = 0.0
    max_f1_drop: float | None = 0.0
    min_labelled: int = 200
    quality_confidence: float = 0.95

    def quality_limits(self) -> QualityLimits:
        return QualityLimits(self.max_drift, self.min_drift_samples, self.max_estimated_drop,
                             self.min_estimate_samples, self.max_accuracy_drop,
                             self.max_f1_drop, self.min_labelled, self.quality_confidence)

    def __post_init__(self) -> None:
        _check_numbers(self, "gates")
        if not 0.5 <= self.quality_confidence < 1 or min(
                self.min_drift_samples, self.min_estimate_samples, self.min_labelled) < 0:
            raise ConfigError("gates: quality_confidence in [0.5, 1), min_* >= 0",
                              key="quality_confidence")
        for name in ("min_install_success", "max_error_rate", "min_shadow_agreement"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ConfigError(f"gates.{name} {value}: a fraction in [0, 1]", key=name)
        if self.max_latency_ratio <= 0 or self.min_requests < 0:
            raise ConfigError("gates: max_latency_ratio > 0, min_requests >= 0",
                              key="gates")


def _check_numbers(obj: Any, where: str) -> None:
    """Every numeric field a finite number of its declared kind (JSON may say NaN, "3"
    or true where a number belongs; none of them may reach the gates)."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        kind = str(f.type)
        if "float" not in kind and "int" not in kind or "tuple" in kind or "Gates" in kind:
            continue
        if value is None and "None" in kind:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or ("float" not in kind and
                                                       not isinstance(value, int)):
            raise ConfigError(f"{where}.{f.name} {value!r}: a finite "
                              f"{'number' if 'float' in kind else 'integer'}", key=f.name)


OFFLINE_POLICIES = ("wait", "skip", "fail")


@dataclass(frozen=True)
class Policy:
    waves: tuple[float, ...] = (0.01, 0.10, 0.50, 1.0)  # cumulative fractions of the group
    on_failure: str = "pause"               # "pause" | "rollback"
    soak_s: float = 30.0                    # serving time after the installs before judging
    wave_timeout_s: float = 900.0           # no verdict by then: the wave fails
    max_concurrent: int = 50                # devices downloading at once
    jitter_s: float = 10.0                  # desired-state publishes spread over this window
    baseline_window_s: float = 600.0        # old-version telemetry used as the baseline
    all_or_none: bool = False               # one wave: all stage, then one commit switches
    #                                         all; any failure: all discard (see docs/rollouts.md)
    offline: str = "wait"                   # a wave's device offline past its deadline:
    #                                         "wait" (until wave_timeout_s), "skip" it, or
    #                                         count it as "fail"ed (reason "offline")
    offline_grace_s: float = 300.0          # deadline = max(wave start, last seen) + this
    gates: Gates = Gates()

    def __post_init__(self) -> None:
        _check_numbers(self, "policy")
        w = self.waves
        if not isinstance(w, tuple) or not all(
                isinstance(f, (int, float)) and not isinstance(f, bool) for f in w):
            raise ConfigError(f"waves {w!r}: numbers", key="waves")
        if self.offline not in OFFLINE_POLICIES:
            raise ConfigError(f"offline {self.offline!r}: one of "
                              f"{', '.join(OFFLINE_POLICIES)}", key="offline")
        if self.wave_timeout_s <= 0 or self.offline_grace_s < 0 or \
                self.baseline_window_s < 0:
            raise ConfigError("wave_timeout_s > 0, offline_grace_s >= 0, "
                              "baseline_window_s >= 0", key="policy")
        if not isinstance(self.all_or_none, bool) or self.on_failure not in (
                "pause", "rollback"):
            raise ConfigError("on_failure must be 'pause' or 'rollback'; all_or_none a "
                              "boolean", key="on_failure")
        if not w or any(not 0 < f <= 1 for f in w) or list(w) != sorted(w) or w[-1] != 1:
            raise ConfigError(f"waves {list(w)}: increasing fractions in (0, 1] ending at 1",
                              key="waves")
        if self.on_failure not in ("pause", "rollback"):
            raise ConfigError("on_failure must be 'pause' or 'rollback'", key="on_failure")
        if self.max_concurrent < 1 or self.soak_s < 0 or self.jitter_s < 0:
            raise ConfigError("max_concurrent >= 1, soak_s >= 0, jitter_s >= 0", key="policy")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "Policy":
        if not isinstance(raw, Mapping) or not isinstance(raw.get("gates", {}), Mapping) \
                or not isinstance(raw.get("waves", ()), (list, tuple)):
            raise ConfigError("policy: an object (gates an object, waves a list)",
                              key="policy")
        raw = dict(raw)
        gates = Gates(**raw.pop("gates", {}))
        raw["waves"] = tuple(raw.get("waves", cls.waves))
        if raw.get("all_or_none"):
            raw["waves"] = (1.0,)
        return cls(gates=gates, **raw)


def parse_waves(text: str) -> tuple[float, ...]:
    """'1,10,50,100' (percent) → (0.01, 0.1, 0.5, 1.0)."""
    try:
        return tuple(float(p.strip().rstrip("%")) / 100 for p in text.split(",") if p.strip())
    except ValueError:
        raise ConfigError(f"waves {text!r}: comma-separated percentages, e.g. 1,10,50,100",
                          key="waves") from None
