"""Pick the variant of a bundle that suits this device (pure)."""

from __future__ import annotations

from typing import Iterable

from edgeship.agent.errors import BundleError, Reason
from edgeship.agent.llm.spec import LLM_PRECISIONS, MemoryBudgetError, check_fits
from edgeship.agent.manifest import Manifest, Variant


def select_variant(manifest: Manifest, preferred_precisions: Iterable[str],
                   runtimes: Iterable[str], arch: str,
                   memory_budget_mb: float | None = None) -> Variant:
    """First variant, in the profile's order of preferred precisions, whose runtime this
    agent has and whose hardware list names this architecture. A language model takes the
    smallest precision first (int4, int8, fp16, fp32) among those whose weights + KV cache
    fit ``memory_budget_mb``; none fitting is refused with MEMORY_BUDGET_EXCEEDED."""
    usable = [v for v in manifest.variants
              if v.runtime in set(runtimes) and arch in v.hardware]
    if manifest.llm is not None and usable:
        return select_llm_variant(manifest, usable, memory_budget_mb)
    for precision in preferred_precisions:
        for v in usable:
            if v.precision == precision or v.precision.startswith(precision + "-") or \
                    precision.startswith(v.precision + "-"):
                return v
    raise BundleError(f"{manifest.model} v{manifest.version} has no variant for this "
                      f"device (arch {arch}, runtimes {sorted(set(runtimes))}, variants "
                      f"{[v.id for v in manifest.variants]})",
                      reason_code=Reason.NO_COMPATIBLE_VARIANT)


def select_llm_variant(manifest: Manifest, usable: list[Variant],
                       memory_budget_mb: float | None) -> Variant:
    """The smallest-precision variant of a language model that fits the budget."""
    ranked = sorted(usable, key=lambda v: LLM_PRECISIONS.index(v.precision)
                    if v.precision in LLM_PRECISIONS else len(LLM_PRECISIONS))
    if memory_budget_mb is None or manifest.llm is None or not ranked:
        return ranked[0]
    last: MemoryBudgetError | None = None
    for v in ranked:
        try:
            check_fits(manifest.model, manifest.llm, v.metrics, memory_budget_mb,
                       where="this device's profile (model_memory_budget_mb)")
            return v
        except MemoryBudgetError as e:
            last = e
    assert last is not None
    raise last
