"""Which fleet server handles which device, when several share one registry.

On a broker with shared subscriptions, the broker splits transfer requests between fleet
servers. Without them (ejabberd, aedes, many clusters) every fleet server subscribes to all
requests and each answers only the devices it *owns*: a rendezvous hash of the device id
over the live fleet servers. Membership goes through the registry (``fleet_members``): each
server joins, renews its row every ``refresh_s`` and reads everyone's rows.

Every server must compute the same owner for the same device at the same moment, or a
request is answered twice (the device drops the second answer) or not at all (the device
retries). So membership is a function of the rows and the clock, not of when a server last
looked: a server counts from ``since + settle_s`` (every other server has read its row by
then, since ``settle_s`` > ``refresh_s``) until ``until`` (a graceful leave, announced
``settle_s`` ahead while it keeps serving) or ``expires_at`` (a crash: renewed every
``refresh_s``, ``ttl_s`` > 2 ``refresh_s`` so a stale read never expires a live server).
While no server is settled (a fleet starting up) the one that joined first counts alone:
a server joining later never changes which one that is, so every view agrees.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from edgeship.agent.errors import ConfigError
from edgeship.fleet.registry import Registry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    id: str
    since: float
    until: float | None
    expires_at: float


def live_members(members: Iterable[Member], now: float, settle_s: float) -> list[str]:
    """The ids that count at ``now`` (pure; the same rows and clock give the same answer
    on every server)."""
    current = [m for m in members
               if now < m.expires_at and (m.until is None or now < m.until)]
    settled = sorted(m.id for m in current if m.since + settle_s <= now)
    if settled or not current:
        return settled
    return [min(current, key=lambda m: (m.since, m.id)).id]


def owner(device: str, members: Iterable[str]) -> str | None:
    """Rendezvous (highest random weight) hashing: each device goes to the member with the
    largest hash of (member, device); a member joining or leaving moves only its share."""
    best, best_score = None, b""
    for member in members:
        score = hashlib.sha256(f"{member}\0{device}".encode()).digest()
        if best is None or score > best_score:
            best, best_score = member, score
    return best


@dataclass(frozen=True)
class MembershipSettings:
    refresh_s: float = 1.0
    settle_s: float = 3.0
    ttl_s: float = 10.0

    def check(self) -> None:
        if not 0 < self.refresh_s < self.settle_s:
            raise ConfigError("membership settle_s must exceed refresh_s > 0", key="settle_s")
        if self.ttl_s <= 2 * self.refresh_s + 1:
            raise ConfigError("membership ttl_s must exceed 2 x refresh_s + 1 s",
                              key="ttl_s")


class Membership:
    """This server's row in ``fleet_members`` and a cached view of everyone's."""

    def __init__(self, registry: Registry, member_id: str,
                 settings: MembershipSettings = MembershipSettings(),
                 clock: Callable[[], float] = time.time) -> None:
        settings.check()
        self.registry = registry
        self.id = member_id
        self.settings = settings
        self._clock = clock
        self._rows: tuple[Member, ...] = ()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.registry.join_member(self.id, self.settings.ttl_s)
        self.refresh()
        self._thread = threading.Thread(target=self._loop, name="fleet-membership",
                                        daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.refresh_s):
            try:
                if not self.registry.renew_member(self.id, self.settings.ttl_s):
                    logger.warning("fleet member %s was forgotten by the registry: "
                                   "joining again", self.id)
                    self.registry.join_member(self.id, self.settings.ttl_s)
                self.refresh()
            except Exception:  # the registry may be briefly unreachable; retry next tick
                logger.warning("fleet membership refresh failed", exc_info=True)

    def refresh(self) -> None:
        self._rows = tuple(Member(*row) for row in self.registry.members())

    def live(self, now: float | None = None) -> list[str]:
        now = self._clock() if now is None else now
        return live_members(self._rows, now, self.settings.settle_s)

    def owns(self, device: str, now: float | None = None) -> bool:
        return owner(device, self.live(now)) == self.id

    def leave(self) -> float:
        """Announce the leave ``settle_s`` ahead; returns when this server may stop
        answering (the others take over from then on)."""
        until = self._clock() + self.settings.settle_s
        try:
            self.registry.leave_member(self.id, until)
        except Exception:  # the row then expires after ttl_s
            logger.warning("could not record leaving the fleet", exc_info=True)
        return until

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
