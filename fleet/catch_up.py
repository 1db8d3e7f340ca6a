"""What the fleet re-sends to a device that comes online, so that no device depends on the
broker delivering retained messages (ejabberd does not across nodes; sessions expire).

Pure: from what the device says it runs (its presence), its desired state records and the
newest announcement per model, the messages to publish. The device ignores what it already
has (a desired ``seq`` it accepted, an announced version it serves), and the fleet skips
what it can tell is not needed, so a reconnect costs a few small messages at most.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable

from edgeship.agent.protocol import DesiredState, ReleaseAnnouncement, Topics

MAX_TRACKED_DEVICES = 100_000  # connections remembered (the oldest forgotten first)


@dataclass(frozen=True)
class Outgoing:
    topic: str
    payload: bytes
    retain: bool


def running_versions(presence: dict[str, Any]) -> dict[str, int]:
    """model -> version the device says it serves (from a ``presence`` message)."""
    models = presence.get("models")
    out = {}
    for name, entry in (models.items() if isinstance(models, dict) else ()):
        version = entry.get("version") if isinstance(entry, dict) else entry
        if isinstance(version, int) and not isinstance(version, bool):
            out[str(name)] = version
    return out


def catch_up(device: str, running: dict[str, int], desired: Iterable[Any],
             announcements: Iterable[tuple[str, int, float, float]]) -> list[Outgoing]:
    """``desired``: the device's :class:`fleet.registry.DesiredRecord` rows (retained
    re-publish; the device acts only on a newer ``seq``). ``announcements``: (model,
    version, released_at, spread_s), sent on the device's own release topic for models no
    desired state governs and that the device does not already serve at that version or
    above."""
    out = []
    governed = set()
    for rec in desired:
        governed.add(rec.model)
        state = DesiredState(rec.model, rec.version, rec.seq, rec.rollout, hold=rec.hold)
        out.append(Outgoing(Topics.desired(device), state.to_bytes(), True))
    for model, version, released_at, spread_s in announcements:
        if model in governed or running.get(model, 0) >= version:
            continue
        ann = ReleaseAnnouncement(model, version, released_at, spread_s)
        out.append(Outgoing(Topics.device_release(device, model), ann.to_bytes(), False))
    return out


class Arrivals:
    """Which presences mean a device just came online: live (``online: true``), not a
    retained copy, and from a connection not seen yet (``connected_at`` changes with each
    connect; an agent without it counts on every live presence). One thread uses it."""

    def __init__(self, max_devices: int = MAX_TRACKED_DEVICES) -> None:
        self.max_devices = max_devices
        self._seen: OrderedDict[str, Any] = OrderedDict()  # device -> its connected_at

    def is_new(self, device: str, presence: dict[str, Any], *, online: bool,
               retained: bool) -> bool:
        if not online or retained:
            return False
        connected_at = presence.get("connected_at")
        if connected_at is None:
            return True
        if self._seen.get(device) == connected_at:
            return False
        self._seen[device] = connected_at
        self._seen.move_to_end(device)
        if len(self._seen) > self.max_devices:
            self._seen.popitem(last=False)
        return True
