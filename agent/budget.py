"""Which latency budget a release is held to on this device (pure).

1. the release's own (``latency_budget_ms`` in the manifest, from ``edgeship convert`` or
   ``edgeship release --latency-budget-ms``);
2. else derived from what the converter measured for the chosen variant, scaled by how much
   slower the board is (its profile's ``latency_scale``), with headroom;
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
        return LatencyBudget(measured * latency_scale * DERIVED_HEADROOM,
                             f"derived: {measured:.3g} ms measured by the converter x "
                             f"{latency_scale:g} for this board x {DERIVED_HEADROOM:g}")
    return LatencyBudget(profile_budget_ms, "the board profile's default budget")
