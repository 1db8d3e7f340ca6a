"""Which latency budget a release is held to on this device (pure).

1. the release's own (``latency_budget_ms`` in the manifest, from ``edgeship convert`` or
   ``edgeship release --latency-budget-ms``);
2. else derived from what the converter measured for the chosen variant, scaled by how much
   slower the board is (its profile's ``latency_scale``), with headroom, and never below
   the profile's default (fixed per-call overhead dominates tiny models);
3. else the board profile's ``latency_budget_ms``, only a default.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeship.agent.manifest import Manifest, Variant

DERIVED_HEADROOM = 4.0


@dataclass(frozen=True)
class LatencyBudget:
    ms: float | None
    source: str  # said in the refusal: "the release's budget", "derived: ...", ...


def latency_budget(manifest: Manifest, variant: Variant, profile_budget_ms: float | None,
                   latency_scale: float | None) -> LatencyBudget:
    if manifest.latency_budget_ms is not None:
        return LatencyBudget(manifest.latency_budget_ms, "the release's budget")
    measured = variant.metrics.get("latency_p50_ms")
    if measured and measured > 0 and latency_scale:
        derived = measured * latency_scale * DERIVED_HEADROOM
        if profile_budget_ms is None or derived > profile_budget_ms:
            return LatencyBudget(derived, f"derived: {measured:.3g} ms measured by the "
                                 f"converter x {latency_scale:g} for this board x "
                                 f"{DERIVED_HEADROOM:g}")
    return LatencyBudget(profile_budget_ms, "the board profile's default budget")
