"""Pick the variant of a bundle that suits this device (pure)."""

from __future__ import annotations

from typing import Iterable

from edgeship.agent.errors import BundleError, Reason
from edgeship.agent.llm.spec import LLM_PRECISIONS, MemoryBudgetError, check_fits
from edgeship.agent.manifest import Manifest, Variant

#: A variant counts as measured slower than another only beyond this ratio: timing noise
#: on a CPU of the device's kind (the converter's machine has the device's architecture),
#: and on another architecture only a gap no instruction set closes (e.g. ConvInteger
#: kernels many times slower than float convolutions).
SAME_ARCH_MARGIN = 1.10
CROSS_ARCH_MARGIN = 2.0
#: ... and never by less than this per sample: a few µs between two tiny variants is timing
#: noise and far below what a request through the local API costs, and letting it decide
#: would flip a device between variants from one release to the next (no deltas then)
MIN_GAP_MS = 0.05


def _matches(v: Variant, precision: str) -> bool:
    return v.precision == precision or v.precision.startswith(precision + "-") or \
        precision.startswith(v.precision + "-")


def measured_slower(v: Variant, usable: list[Variant],
                    margin: float = SAME_ARCH_MARGIN) -> Variant | None:
    """Another usable variant of the same runtime the converter measured clearly faster."""
    mine = v.metrics.get("latency_p50_ms")
    if not mine:
        return None
    for w in usable:
        theirs = w.metrics.get("latency_p50_ms")
        if w is not v and w.runtime == v.runtime and theirs and mine > theirs * margin \
                and mine - theirs >= MIN_GAP_MS:
            return w
    return None


def select_variant(manifest: Manifest, preferred_precisions: Iterable[str],
                   runtimes: Iterable[str], arch: str,
                   memory_budget_mb: float | None = None, *,
                   use_measurements: bool = False) -> Variant:
    """First variant, in the profile's order of preferred precisions, whose runtime this
    agent has and whose hardware list names this architecture. With ``use_measurements``
    (CPU boards) a variant the converter measured slower than another usable variant of the
    same runtime is passed over (see the margins above). A language model takes the
    smallest precision first (int4, int8, fp16, fp32) among those whose weights + KV cache
    fit ``memory_budget_mb``; none fitting is refused with MEMORY_BUDGET_EXCEEDED."""
    usable = [v for v in manifest.variants
              if v.runtime in set(runtimes) and arch in v.hardware]
    if manifest.llm is not None and usable:
        return select_llm_variant(manifest, usable, memory_budget_mb)
    ordered: list[Variant] = []
    for p in preferred_precisions:
        ordered += [v for v in usable if _matches(v, p) and v not in ordered]
    if use_measurements:
        same_kind = manifest.measured_on.get("arch") == arch
        margin = SAME_ARCH_MARGIN if same_kind else CROSS_ARCH_MARGIN
        fast = [v for v in ordered if measured_slower(v, ordered, margin) is None]
        ordered = fast or ordered
    if ordered:
        return ordered[0]
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
