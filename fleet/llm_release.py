"""Release-time memory check of a language model against board profiles (pure).

For each profile: the variant the device would pick (``agent.selection``: the smallest
precision whose weights + KV cache at the full context fit ``model_memory_budget_mb``),
or the reason none fits. ``edgeship release --profile P`` refuses, before anything is
signed, a language model that fits none of the named profiles.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeship.agent.llm.spec import MemoryBudgetError, variant_memory_mb
from edgeship.agent.manifest import Manifest
from edgeship.agent.selection import select_llm_variant


@dataclass(frozen=True)
class Fit:
    profile: str
    budget_mb: float
    variant: str | None
    need_mb: float | None
    reason: str = ""


def memory_fits(manifest: Manifest, budgets: dict[str, float]) -> list[Fit]:
    fits = []
    for profile, budget in budgets.items():
        try:
            v = select_llm_variant(manifest, list(manifest.variants), budget)
            fits.append(Fit(profile, budget, v.id, variant_memory_mb(manifest.llm, v.metrics)))
        except MemoryBudgetError as e:
            fits.append(Fit(profile, budget, None, e.need_mb, str(e)))
    return fits


def check_release(manifest: Manifest, budgets: dict[str, float]) -> list[Fit]:
    """Raise ``MemoryBudgetError`` naming the first profile nothing fits."""
    fits = memory_fits(manifest, budgets)
    for f in fits:
        if f.variant is None:
            raise MemoryBudgetError(f"{manifest.model} v{manifest.version} fits no variant "
                                    f"into profile {f.profile}: the smallest needs "
                                    f"{f.need_mb:.0f} MB (weights + KV cache at the full "
                                    f"context), the budget is {f.budget_mb:.0f} MB",
                                    need_mb=f.need_mb or 0.0, budget_mb=f.budget_mb)
    return fits
