"""What this device should install next: a pure planner, no threads, disk or network.

Two sources ask for versions. Fleet-wide release announcements (newest version wins, each
fetch started at the device's own offset in the release's ``spread_s`` window) and the
fleet's per-device desired state (exactly that version, ``hold`` for all-or-none). A
model with a desired state is governed by it: announcements for it are ignored, and any
other version the fleet asks for supersedes a running trial.

:meth:`Planner.plan` turns what is wanted and what the device has (:class:`DeviceView`)
into the driver's next steps. The update worker (``agent.update.worker``) owns the locks
and the waiting; tests drive the planner with a fake desired state and plain numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Protocol

from edgeship.agent import protocol
from edgeship.agent.errors import Reason
from edgeship.common.compat import StrEnum

logger = logging.getLogger(__name__)


class DesiredView(Protocol):
    """The newest desired state the device accepted (``agent.update.desired``)."""

    def version(self, model: str) -> int | None: ...

    def holds(self, model: str) -> bool: ...

    def governs(self, model: str) -> bool: ...


@dataclass(frozen=True)
class DeviceView:
    """What the device has of one model."""

    active: int | None = None
    held: int | None = None  # staged and checked on a hold, waiting for the commit
    kept: tuple[int, ...] = ()  # versions in the store (an older one can serve again)
    blocked: tuple[int, ...] = ()  # reverted before: never installed again
    known: bool = True  # the device has files or a record of this model
    models: int = 0  # models the device has (files or records)


class Do(StrEnum):
    INSTALL = "install"
    STAGE = "stage"  # all-or-none: stage, check, report held
    COMMIT = "commit"  # switch to the held copy
    DISCARD = "discard"  # drop the held copy
    REVERT = "revert"  # serve a kept older version again (else install it)
    REJECT = "reject"  # report why not (reason, detail)


@dataclass(frozen=True)
class Step:
    do: Do
    version: int
    reason: Reason | None = None
    detail: str | None = None


@dataclass
class Planner:
    """``known``: whether the device has a model (None: every model counts as known). An
    announcement of a model it does not know is only a name anyone on the broker can send:
    it waits, bounded, in ``unconfirmed`` until the signed metadata confirms it."""

    device: str
    desired: DesiredView
    max_attempts_per_version: int = 3
    max_models: int = 32  # models a device keeps (files or records)
    max_unconfirmed: int = 64  # unknown models waiting for the signed metadata
    known: Callable[[str], bool] | None = None
    wanted: dict[str, int] = field(default_factory=dict)  # model -> version to act on
    not_before: dict[str, float] = field(default_factory=dict)  # model -> monotonic start
    attempts: dict[tuple[str, int], int] = field(default_factory=dict)
    unconfirmed: dict[str, protocol.ReleaseAnnouncement] = field(default_factory=dict)
    #: announcements of unknown models: not in the signed metadata / over the bound
    counters: dict[str, int] = field(default_factory=lambda: {"unconfirmed": 0,
                                                              "dropped": 0})

    # --- what is wanted ---------------------------------------------------------------------

    def announced(self, ann: protocol.ReleaseAnnouncement, now: float,
                  monotonic: float) -> bool:
        """A release announcement; True when it changed what is wanted."""
        if self.desired.governs(ann.model):  # the rollout decides for this model
            return False
        if self.known is not None and not self.known(ann.model):
            return self._await_confirmation(ann)
        delay_s = protocol.spread_delay_s(self.device, ann.model, ann.version, ann.spread_s,
                                          ann.released_at, now)
        self.not_before[ann.model] = monotonic + delay_s
        return self.want(ann.model, ann.version)

    def _await_confirmation(self, ann: protocol.ReleaseAnnouncement) -> bool:
        held = self.unconfirmed.get(ann.model)
        if held is None and len(self.unconfirmed) >= self.max_unconfirmed:
            self.counters["dropped"] += 1
            return False
        if held is None or ann.version > held.version:
            self.unconfirmed[ann.model] = ann
        return True

    def requeue(self, taken: list[protocol.ReleaseAnnouncement]) -> None:
        """The metadata could not be checked: keep them for the next try (bounded)."""
        for ann in taken:
            self._await_confirmation(ann)

    def take_unconfirmed(self) -> list[protocol.ReleaseAnnouncement]:
        taken, self.unconfirmed = list(self.unconfirmed.values()), {}
        return taken

    def confirmed(self, taken: list[protocol.ReleaseAnnouncement],
                  found: set[tuple[str, int]], now: float, monotonic: float) -> bool:
        """The signed metadata lists ``found``: those become wanted, the rest are counted
        and forgotten. True when something is wanted now."""
        wanted = False
        for ann in taken:
            if (ann.model, ann.version) not in found:
                self.counters["unconfirmed"] += 1
                continue
            delay_s = protocol.spread_delay_s(self.device, ann.model, ann.version,
                                              ann.spread_s, ann.released_at, now)
            self.not_before[ann.model] = monotonic + delay_s
            wanted = self.want(ann.model, ann.version) or wanted
        return wanted

    def retry(self, model: str, version: int) -> bool:
        """Try ``version`` again after a failure that was the environment's fault (it does
        not count as an attempt)."""
        self.attempts.pop((model, version), None)
        return self.want(model, version)

    def want(self, model: str, version: int, exact: bool = False) -> bool:
        """``exact``: the fleet asked for this version (a desired state), older or not."""
        if exact or self.desired.governs(model) or version > self.wanted.get(model, 0):
            self.wanted[model] = version
            return True
        return False

    def superseded(self, model: str, version: int) -> bool:
        """Another version of ``model`` is waiting (ends its running trial early): a newer
        one, or any other the fleet asked for (a rollout's rollback)."""
        wanted = self.wanted.get(model)
        return wanted is not None and (wanted > version or (
            wanted != version and self.desired.governs(model)))

    def pop(self) -> tuple[str, int] | None:
        return self.wanted.popitem() if self.wanted else None

    def spread_wait_s(self, model: str, monotonic: float) -> float:
        """How long to wait before fetching an announced ``model`` (0 for a desired one)."""
        if self.desired.governs(model):
            return 0.0
        return max(0.0, self.not_before.pop(model, 0.0) - monotonic)

    def still_wanted(self, model: str, version: int) -> bool:
        """After the spread wait: False when a newer version was announced or a rollout
        took the model over meanwhile."""
        return not (self.wanted.get(model, 0) > version or self.desired.governs(model))

    @staticmethod
    def dealt_with(version: int, device: DeviceView) -> bool:
        """The device serves this version or a newer one, or reverted it before."""
        return (device.active is not None and version <= device.active) or \
            version in device.blocked

    # --- what to do about it ----------------------------------------------------------------

    def plan(self, model: str, version: int, device: DeviceView) -> list[Step]:
        if not device.known and device.models >= self.max_models:
            return [Step(Do.REJECT, version, Reason.TOO_MANY_MODELS,
                         f"this device keeps at most {self.max_models} models")]
        if self.desired.governs(model):
            return self._plan_desired(self.desired.version(model) or version,
                                      self.desired.holds(model), device)
        return self._plan_announced(model, version, device)

    def _plan_desired(self, version: int, hold: bool, device: DeviceView) -> list[Step]:
        if hold:
            return [Step(Do.STAGE, version)]
        if device.held == version:
            return [Step(Do.COMMIT, version)]
        steps = [] if device.held is None else [Step(Do.DISCARD, device.held)]
        if device.active == version:
            return steps
        if device.active is not None and version < device.active and version in device.kept:
            return steps + [Step(Do.REVERT, version)]
        return steps + [Step(Do.INSTALL, version)]

    def _plan_announced(self, model: str, version: int, device: DeviceView) -> list[Step]:
        if device.active is not None and version <= device.active:
            if version == device.active:
                return []
            return [Step(Do.REJECT, version, Reason.STALE_ANNOUNCEMENT,
                         f"v{device.active} is installed")]
        if version in device.blocked:
            return [Step(Do.REJECT, version, Reason.VERSION_BLOCKED,
                         "this version was reverted on this device before")]
        attempts = self.attempts.get((model, version), 0)
        if attempts >= self.max_attempts_per_version:
            logger.info("not retrying %s v%s after %d attempts", model, version, attempts)
            return []
        self.attempts[(model, version)] = attempts + 1
        return [Step(Do.INSTALL, version)]
