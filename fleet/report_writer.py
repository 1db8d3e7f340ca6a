"""The fleet server's one thread that stores device reports (presence, status,
telemetry) in the registry, a batch per transaction, and catches up the devices of each
batch that came online (:mod:`fleet.catch_up`).

paho's thread only puts messages into :attr:`ReportWriter.queue` (bounded; the server
counts what a full queue drops). Reports of devices another fleet server owns are counted
and skipped; a malformed one is counted and logged; a registry that fails is logged and
the writer goes on.
"""

from __future__ import annotations

import logging
import queue
from typing import Callable

from edgeship.agent.errors import ProtocolError
from edgeship.agent.protocol import decode, parse_topic
from edgeship.common.mqtt_types import Message
from edgeship.fleet.catch_up import Arrivals, Outgoing, catch_up, running_versions
from edgeship.fleet.membership import Membership
from edgeship.fleet.registry import Registry, presence_online

logger = logging.getLogger(__name__)

_STOP = object()


class ReportWriter:
    """``run`` is the thread's body; ``stop`` ends it once what is queued is stored.
    ``count(**deltas)`` bumps the server's counters; ``send`` publishes a catch-up
    message."""

    def __init__(self, registry: Registry, membership: Membership, *, queue_max: int,
                 batch_max: int, count: Callable[..., None],
                 send: Callable[[Outgoing], None]) -> None:
        self.registry = registry
        self.membership = membership
        self.batch_max = batch_max
        self.count = count
        self.send = send
        self.queue: queue.Queue = queue.Queue(maxsize=queue_max)
        self.arrivals = Arrivals()  # which presences are new connections

    def stop(self) -> None:
        self.queue.put(_STOP)

    def _report(self, msg: Message) -> tuple[str, str, dict] | None:
        """(kind, device, body) of a presence/status/telemetry message of a device this
        server owns; None for a cleared retained message, another server's device or a
        malformed message (both counted)."""
        try:
            parsed = parse_topic(msg.topic)
            if parsed.kind not in ("presence", "status", "telemetry") or not msg.payload \
                    or parsed.device is None:
                return None
            if not self.membership.owns(parsed.device):
                self.count(not_mine=1)
                return None
            return parsed.kind, parsed.device, decode(msg.payload)
        except ProtocolError as e:
            self.count(malformed=1)
            logger.warning("malformed report on %s: %s", msg.topic, e)
            return None

    def run(self) -> None:
        """The one thread that stores device reports: whatever queued up while it wrote
        the last batch goes into the next transaction (up to ``batch_max``); then
        the devices of the batch that came online are caught up."""
        while True:
            item = self.queue.get()
            batch, arrivals, stop = [], [], item is _STOP
            while not stop:
                report = self._report(item)
                if report is not None:
                    batch.append(report)
                    kind, device, body = report
                    if kind == "presence" and self.arrivals.is_new(
                            device, body, online=presence_online(body), retained=item.retain):
                        arrivals.append((device, body))
                if len(batch) >= self.batch_max:
                    break
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
                stop = item is _STOP
            if batch:
                self._store(batch, arrivals)
            if stop:
                return

    def _store(self, batch: list[tuple[str, str, dict]],
               arrivals: list[tuple[str, dict]]) -> None:
        try:
            self.count(records=self.registry.add_reports(batch))
        except Exception:  # the database is gone: count it, keep going
            logger.exception("could not store %d device reports", len(batch))
            return
        try:
            self._catch_up(arrivals)
        except Exception:  # same: the device is caught up on its next connection
            logger.exception("could not catch up %d device(s) coming online", len(arrivals))

    def _catch_up(self, arrivals: list[tuple[str, dict]]) -> None:
        """Devices that came online: re-send each its desired state and the announcements
        it has not acted on, so none depends on the broker's retained messages."""
        if not arrivals:
            return
        announcements = self.registry.announcements()  # once per batch
        for device, presence in arrivals:
            messages = catch_up(device, running_versions(presence),
                                self.registry.desired(device), announcements)
            for out in messages:
                self.send(out)
            self.count(connections=1, catch_ups=1 if messages else 0)
            if messages:
                logger.info("%s is online: re-sent %d message(s)", device, len(messages))
