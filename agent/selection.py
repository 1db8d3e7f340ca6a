"""Pick the variant of a bundle that suits this device (pure)."""

from __future__ import annotations

from typing import Iterable

from edgeship.agent.errors import BundleError, Reason
from edgeship.agent.manifest import Manifest, Variant


def select_variant(manifest: Manifest, preferred_precisions: Iterable[str],
                   runtimes: Iterable[str], arch: str) -> Variant:
    """First variant, in the profile's order of preferred precisions, whose runtime this
    agent has and whose hardware list names this architecture."""
    usable = [v for v in manifest.variants
              if v.runtime in set(runtimes) and arch in v.hardware]
    for precision in preferred_precisions:
        for v in usable:
            if v.precision == precision or v.precision.startswith(precision + "-") or \
                    precision.startswith(v.precision + "-"):
                return v
    raise BundleError(f"{manifest.model} v{manifest.version} has no variant for this "
                      f"device (arch {arch}, runtimes {sorted(set(runtimes))}, variants "
                      f"{[v.id for v in manifest.variants]})",
                      reason_code=Reason.NO_COMPATIBLE_VARIANT)
