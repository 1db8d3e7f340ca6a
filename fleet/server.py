"""The fleet server: answers transfer requests and records what devices report.

paho's thread only calls :meth:`FleetServer._on_message`, which does ``put_nowait`` into one
of two bounded queues (a full queue drops the message and counts it). A few worker threads
answer transfer requests with raw chunk bytes on the request's ResponseTopic; one writer
thread stores presence/status/telemetry in the registry, a batch per transaction, so a
slow database never holds up transfers. A malformed message is counted and logged, never
fatal.

Several fleet servers may share one registry (docs/scaling.md). Transfer requests reach
them through a shared subscription when the broker has one (CONNACK
``SharedSubscriptionAvailable``, no 0x9E refusal); otherwise each subscribes to all of them
and answers only the devices it owns (:mod:`fleet.membership`). Reports are stored, and a
device coming online is caught up (:mod:`fleet.catch_up`), by its owner only
(:mod:`fleet.report_writer`).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from edgeship.agent.errors import ConfigError, EdgeshipError, ProtocolError
from edgeship.common.mqtt import (SUBACK_TIMEOUT, BrokerFeatures, Message, MqttSession,
                                  SessionSettings, TlsSettings)
from edgeship.agent.protocol import (QOS_AT_LEAST_ONCE, TOPIC_ROOT, DesiredState,
                                     ReleaseAnnouncement, Topics, TransferRequest,
                                     parse_topic, transfer_props)
from edgeship.fleet.catch_up import Outgoing
from edgeship.fleet.membership import Membership, MembershipSettings
from edgeship.fleet.registry import Registry
from edgeship.fleet.report_writer import ReportWriter
from edgeship.fleet.rollout_runner import RolloutRunner
from edgeship.fleet.transfer import (STATUS_BAD_REQUEST, STATUS_BUSY, STATUS_GONE, ChunkResult,
                            DeviceRateLimits, Pacer, StoppedReleases, TransferGate,
                            read_chunk, release_of,
                            stop_release)
from edgeship.fleet.tuf_repo import ReleaseInfo, RepoSettings, online_signer, refresh_timestamp

logger = logging.getLogger(__name__)

_STOP = object()
_DEVICE_TOPICS = f"{TOPIC_ROOT}/dev/"  # .../dev/<id>/presence|status|telemetry
_REPORT_SUFFIXES = ("/presence", "/status", "/telemetry")

#: ``FleetSettings.transfers``: "auto" = a shared subscription when the broker has one, else
#: split by device between the fleet servers; "split" = always split; "off" = no transfer
#: subscription (devices fetch over HTTP, ``transport = "http"``)
TRANSFER_MODES = ("auto", "split", "off")
SHARE_REFUSED = 0x9E  # MQTT 5 "Shared Subscriptions not supported" (SUBACK or DISCONNECT)


@dataclass(frozen=True)
class FleetSettings:
    mqtt_url: str
    repo_dir: Path
    db_path: Path
    client_id: str = ""  # empty: edgeship-fleet-<random>
    workers: int = 4
    queue_max: int = 20_000  # messages waiting for a worker; more are dropped (counted)
    report_batch_max: int = 500  # device reports written in one registry transaction
    connect_timeout_s: float = 10.0
    publish_timeout_s: float = 10.0
    tls: TlsSettings | None = None
    keys_dir: Path | None = None  # online keys: re-sign timestamp every timestamp_refresh_s
    timestamp_refresh_s: float = 2 * 3600  # timestamp expiry is 6 h (RepoSettings)
    max_transfers: int = 200  # concurrent target transfers; more are answered 503
    max_transfers_per_device: int = 2  # a device's newer transfer replaces its oldest
    transfer_idle_s: float = 60.0  # a transfer with no request for this long frees its slot
    announce_spread_s: float = 0.0  # devices spread their fetches over this window; 0 = none
    max_device_bytes_per_s: int = 0  # fleet-side byte-rate cap per device; 0 = unlimited
    pace_max_delay_s: float = 5.0  # a capped answer waits at most this long, else 503
    repo_settings: RepoSettings = RepoSettings()
    rollout_tick_s: float = 1.0  # issue 6: how often the rollout runner looks at the fleet
    http_port: int | None = None  # issue 6: dashboard + REST API + /metrics; None = off
    http_host: str = "127.0.0.1"
    http: Any = None  # fleet.web.server.WebSettings (TLS, allowed hosts, caps); host/port above
    username: str | None = None  # MQTT login (with password, read from a file)
    password: str | None = field(default=None, repr=False)
    transfers: str = "auto"  # see TRANSFER_MODES
    membership: MembershipSettings = MembershipSettings()


@dataclass
class FleetStats:
    """Counters. Workers update them under ``lock``; paho's thread only bumps ``dropped``."""

    requests_served: int = 0
    bytes_sent: int = 0
    transfer_errors: int = 0  # answered with a non-200 status
    no_response_topic: int = 0
    malformed: int = 0
    dropped: int = 0  # queue full
    reports_dropped: int = 0  # the registry writer's queue stayed full
    records: int = 0  # presence/status/telemetry stored
    busy: int = 0  # answered 503 (concurrent-transfer cap)
    stopped: int = 0  # answered 410 (kill switch)
    paced: int = 0  # answers delayed by the per-device byte-rate cap
    not_mine: int = 0  # requests/reports of devices another fleet server owns
    connections: int = 0  # device connections seen coming online (each checked for catch-up)
    catch_ups: int = 0  # devices re-sent their desired state/announcements on coming online
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def bump(self, **deltas: int) -> None:
        with self.lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "lock"}


def response_topic_allowed(request_topic: str, response_topic: str) -> bool:
    """A device may only have answers sent to its own transfer-response topic (or below it),
    so a request cannot make the fleet publish anywhere else."""
    device = parse_topic(request_topic).device
    own = Topics.transfer_response(device)
    return ((response_topic == own or response_topic.startswith(own + "/"))
            and "+" not in response_topic and "#" not in response_topic)


class FleetServer:
    """One fleet-server process. Its MQTT session ends with its connection: a persistent
    session would stay in the shared-subscription group after the process is gone, and the
    broker would keep handing it a share of the transfer requests (devices time out)."""

    def __init__(self, settings: FleetSettings) -> None:
        if settings.transfers not in TRANSFER_MODES:
            raise ConfigError(f"transfers must be one of {', '.join(TRANSFER_MODES)}, got "
                              f"{settings.transfers!r}", key="transfers")
        self.settings = settings
        self.stats = FleetStats()
        self.registry = Registry(settings.db_path)
        self.rollouts = RolloutRunner(self.registry, self.publish_desired,
                                      getattr(self, "stop_release", None),  # issue 3's
                                      tick_s=settings.rollout_tick_s)
        self.web = None  # fleet.web.FleetWebServer when http_port is set
        self._queue: queue.Queue = queue.Queue(maxsize=settings.queue_max)
        self._stopping = threading.Event()
        self.gate = TransferGate(settings.max_transfers, settings.transfer_idle_s,
                                 settings.max_transfers_per_device)
        self.stopped_releases = StoppedReleases(settings.repo_dir)
        self.rates = DeviceRateLimits(settings.max_device_bytes_per_s,  # bursts of 1 s
                                      burst_bytes=max(1, settings.max_device_bytes_per_s))
        self.pacer = Pacer(self._send_paced)
        self._desired_signer = (online_signer(settings.repo_dir, settings.keys_dir)
                                if settings.keys_dir is not None else None)
        self._threads: list[threading.Thread] = []
        self.client_id = settings.client_id or f"edgeship-fleet-{secrets.token_hex(4)}"
        self.membership = Membership(self.registry, self.client_id, settings.membership)
        self.transfer_mode: str | None = None  # "share" | "split" | "off", once connected
        # presence/status/telemetry for the one writer thread, which stores them in batches
        self.reports = ReportWriter(self.registry, self.membership,
                                    queue_max=settings.queue_max,
                                    batch_max=settings.report_batch_max,
                                    count=self.stats.bump, send=self._send)
        self._share_refused = False
        self._session = MqttSession(
            SessionSettings(url=settings.mqtt_url, client_id=self.client_id, clean_start=True,
                            session_expiry_s=0, tls=settings.tls, username=settings.username,
                            password=settings.password),
            on_message=self._on_message, on_subscribe_result=self._on_subscribe_result)

    # --- lifecycle ---------------------------------------------------------------------

    def start(self, *, wait: bool = True) -> None:
        for i in range(self.settings.workers):
            self._spawn(self._worker, f"fleet-worker-{i}")
        self._spawn(self.reports.run, "fleet-reports")
        self.pacer.start()
        if self.settings.keys_dir is not None:
            self._spawn(self._refresher, "fleet-timestamp")
        self.membership.start()
        self._session.start(self._subscriptions)
        if wait and not self._session.wait_connected(self.settings.connect_timeout_s):
            self.stop()
            raise EdgeshipError(f"fleet server could not connect to {self.settings.mqtt_url} "
                                f"within {self.settings.connect_timeout_s}s")
        if wait:  # started = hears the devices: every SUBACK in (or its timeout logged)
            self._session.wait_subscribed(self.settings.connect_timeout_s)
        self.rollouts.start()
        if self.settings.http_port is not None:
            from edgeship.fleet.web.server import FleetWebServer, WebSettings
            web = dataclasses.replace(self.settings.http or WebSettings(),
                                      host=self.settings.http_host,
                                      port=self.settings.http_port)
            self.web = FleetWebServer(self, web)
            self.web.start()

    def _spawn(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def wait_connected(self, timeout_s: float) -> bool:
        return self._session.wait_connected(timeout_s)

    def stop(self) -> None:
        self._stopping.set()
        self.rollouts.stop()
        if self.web is not None:
            self.web.stop()
        self._leave_fleet()
        self.pacer.stop()
        self._session.stop()
        for _ in range(self.settings.workers):
            self._queue.put(_STOP)  # workers drain what is queued, then stop
        for thread in self._threads[:self.settings.workers]:
            thread.join(timeout=10)
        self.reports.stop()  # then the writer stores what they handed it
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads.clear()
        self.membership.stop()
        self.registry.close()
        logger.info("fleet server stopped: %s", self.stats.snapshot())

    def _leave_fleet(self) -> None:
        """Hand this server's devices over: announce the leave ``settle_s`` ahead and keep
        serving until then, so the others take over without a gap (alone: at once)."""
        others = [m for m in self.membership.live() if m != self.client_id]
        until = self.membership.leave()
        if others:
            time.sleep(max(0.0, until - time.time()))

    # --- subscriptions -----------------------------------------------------------------

    def _subscriptions(self, features: BrokerFeatures) -> list[tuple[str, int]]:
        """On every connect: what to subscribe to, given what the broker's CONNACK said."""
        if self._session.last_disconnect_code == SHARE_REFUSED:
            self._refuse_share("the broker disconnected us for it (reason code 0x9e)")
        mode = self.settings.transfers
        if mode == "auto":
            mode = "share" if features.shared_subscriptions and not self._share_refused \
                else "split"
        self._set_mode(mode, "" if features.shared_subscriptions
                       else "the broker has no shared subscriptions")
        subs = [(Topics.DEVICE_PRESENCE_FILTER, QOS_AT_LEAST_ONCE),
                (Topics.DEVICE_STATUS_FILTER, QOS_AT_LEAST_ONCE),
                (Topics.DEVICE_TELEMETRY_FILTER, QOS_AT_LEAST_ONCE),
                (Topics.RELEASES_FILTER, QOS_AT_LEAST_ONCE)]
        if mode == "share":
            subs.insert(0, (Topics.TRANSFER_REQUESTS_SHARED, QOS_AT_LEAST_ONCE))
        elif mode == "split":
            subs.insert(0, (Topics.TRANSFER_REQUESTS, QOS_AT_LEAST_ONCE))
        return subs

    def _set_mode(self, mode: str, why: str) -> None:
        if mode == self.transfer_mode:
            return
        self.transfer_mode = mode
        text = {"share": "through the shared subscription $share/…",
                "split": "split by device between the fleet servers sharing the registry",
                "off": "not served (devices fetch over HTTP)"}[mode]
        logger.info("transfer requests: %s%s", text, f" ({why})" if why and
                    mode == "split" else "")

    def _on_subscribe_result(self, topic_filter: str, code: int) -> None:
        """paho's thread. A refused (or unanswered) $share subscription: split instead."""
        if topic_filter != Topics.TRANSFER_REQUESTS_SHARED or 0 <= code < 0x80:
            return
        self._refuse_share(f"SUBACK {code:#04x}" if code != SUBACK_TIMEOUT else "no SUBACK")
        self._set_mode("split", "")
        self._session.subscribe(Topics.TRANSFER_REQUESTS, QOS_AT_LEAST_ONCE)

    def _refuse_share(self, why: str) -> None:
        if not self._share_refused:
            logger.warning("broker refused the shared subscription (%s): transfer requests "
                           "are split by device between fleet servers instead", why)
        self._share_refused = True

    # --- releases ----------------------------------------------------------------------

    def announce(self, info: ReleaseInfo, *, by: str | None = None,
                 spread_s: float | None = None) -> None:
        """Publish the retained release announcement (waits for the PUBACK) and record it.
        ``spread_s`` (default ``settings.announce_spread_s``): devices start fetching at a
        per-device offset within this window (docs/protocol.md)."""
        spread_s = self.settings.announce_spread_s if spread_s is None else spread_s
        payload = ReleaseAnnouncement(info.model, info.version, info.released_at,
                                      spread_s).to_bytes()
        rc = self._session.publish_acked(Topics.release(info.model), payload, retain=True,
                                         timeout_s=self.settings.publish_timeout_s)
        if rc >= 0x80:
            raise EdgeshipError(f"broker refused the announcement of {info.model} "
                                f"v{info.version} (reason code {rc:#x})")
        self.registry.add_release(info.model, info.version, info.released_at, by)
        self.registry.note_announcement(info.model, info.version, info.released_at, spread_s)

    def stop_release(self, model: str, version: int, *, stopped: bool = True) -> None:
        """Kill switch: stop (or, with ``stopped=False``, allow again) every transfer of
        this release on every fleet server sharing the repository; devices mid-download
        fail with reason ``release_stopped`` and keep serving what they have."""
        stop_release(self.settings.repo_dir, model, version, stopped=stopped)
        self.stopped_releases.look_again()

    def publish_desired(self, device: str, desired: DesiredState) -> None:
        """Retained per-device desired state (QoS 1; the newest ``(epoch, seq)`` wins on the
        device), in this registry's epoch, signed with the timestamp key when this server
        holds the online keys."""
        desired = replace(desired, epoch=self.registry.epoch, sig=None)
        if self._desired_signer is not None:
            signature = self._desired_signer.sign(desired.signing_bytes(device))
            desired = replace(desired, sig=(signature.keyid, signature.signature))
        self._session.publish(Topics.desired(device), desired.to_bytes(),
                              qos=QOS_AT_LEAST_ONCE, retain=True)

    # --- paho's thread -----------------------------------------------------------------

    def _on_message(self, msg: Message) -> None:
        report = msg.topic.startswith(_DEVICE_TOPICS) and msg.topic.endswith(_REPORT_SUFFIXES)
        try:
            (self.reports.queue if report else self._queue).put_nowait(msg)
        except queue.Full:  # only this thread writes these two counters
            if report:
                self.stats.reports_dropped += 1
            else:
                self.stats.dropped += 1

    # --- workers -----------------------------------------------------------------------

    def _worker(self) -> None:
        while True:
            msg = self._queue.get()
            if msg is _STOP:
                return
            try:
                self._dispatch(msg)
            except Exception:  # a worker must survive anything one message does
                self.stats.bump(malformed=1)
                logger.exception("failed to handle message on %s", msg.topic)

    def _dispatch(self, msg: Message) -> None:
        try:
            parsed = parse_topic(msg.topic)
        except ProtocolError as e:
            self.stats.bump(malformed=1)
            logger.warning("ignoring message on unknown topic: %s", e)
            return
        if parsed.kind == "release" and parsed.device is None:
            self._note_announcement(msg)
        elif parsed.kind == "transfer_req" and self._answers(parsed.device or ""):
            self._handle_transfer(msg)

    def _answers(self, device: str) -> bool:
        """A transfer request over $share is this server's (the broker chose); split, the
        device's owner among the live fleet servers answers it."""
        if self.transfer_mode == "share" or self.membership.owns(device):
            return True
        self.stats.bump(not_mine=1)
        return False

    def _note_announcement(self, msg: Message) -> None:
        if not msg.payload:
            return
        try:
            ann = ReleaseAnnouncement.from_bytes(msg.payload)
        except ProtocolError as e:
            self.stats.bump(malformed=1)
            logger.warning("malformed announcement on %s: %s", msg.topic, e)
            return
        self.registry.note_announcement(ann.model, ann.version, ann.released_at, ann.spread_s)

    def _handle_transfer(self, msg: Message) -> None:
        if not msg.response_topic or not response_topic_allowed(msg.topic, msg.response_topic):
            self.stats.bump(no_response_topic=1)
            logger.warning("dropping transfer request on %s: response topic %r not allowed",
                           msg.topic, msg.response_topic)
            return
        try:
            request = TransferRequest.from_bytes(msg.payload)
        except ProtocolError as e:
            self.stats.bump(malformed=1)
            self._respond(msg, ChunkResult(STATUS_BAD_REQUEST, 0, 0, error=str(e)))
            return
        self._answer(msg, parse_topic(msg.topic).device or "", request)

    def _answer(self, msg: Message, device: str, request: TransferRequest) -> None:
        """The fleet-side per-device byte-rate cap (issue 3): over it, the answer waits in
        the pacer (up to ``pace_max_delay_s``); beyond that, 503 and the device backs off."""
        now = time.monotonic()
        wait_s = self.rates.reserve(device, request.length, now)
        if wait_s <= 0:
            self._respond(msg, self._serve(device, request), compact=request.compact)
        elif wait_s <= self.settings.pace_max_delay_s and \
                self.pacer.schedule(now + wait_s, (msg, device, request)):
            self.stats.bump(paced=1)
        else:
            self.rates.refund(device, request.length)
            self.stats.bump(busy=1)
            self._respond(msg, ChunkResult(STATUS_BUSY, request.offset, 0,
                                           error="over the byte-rate cap, retry later"),
                          compact=request.compact)

    def _send_paced(self, item: tuple[Message, str, TransferRequest]) -> None:
        msg, device, request = item
        self._respond(msg, self._serve(device, request), compact=request.compact)

    def _serve(self, device: str, request: TransferRequest) -> ChunkResult:
        release = release_of(request.path)
        if release is not None and self.stopped_releases.is_stopped(*release):
            self.stats.bump(stopped=1)
            return ChunkResult(STATUS_GONE, request.offset, 0, error="release stopped")
        if release is not None and not self.gate.admit(device, request.path,
                                                        time.monotonic()):
            self.stats.bump(busy=1)
            return ChunkResult(STATUS_BUSY, request.offset, 0, error="busy, retry later")
        result = read_chunk(self.settings.repo_dir, request)
        if release is not None and (result.status != 200 or
                                    result.offset + len(result.data) >= result.total):
            self.gate.finish(device, request.path)
        return result

    def _respond(self, msg: Message, result: ChunkResult, *, compact: bool = False) -> None:
        props = transfer_props(result.status, result.offset, result.total, result.error,
                               compact=compact)
        if result.status == 200:  # counted before the device can see the answer
            self.stats.bump(requests_served=1, bytes_sent=len(result.data))
        else:
            self.stats.bump(transfer_errors=1)
        self._session.publish(msg.response_topic, result.data, qos=QOS_AT_LEAST_ONCE,
                              retain=False, correlation_data=msg.correlation_data,
                              user_properties=props)

    def _send(self, out: Outgoing) -> None:
        self._session.publish(out.topic, out.payload, qos=QOS_AT_LEAST_ONCE,
                              retain=out.retain)

    def _refresher(self) -> None:
        while not self._stopping.wait(self.settings.timestamp_refresh_s):
            try:
                version = refresh_timestamp(self.settings.repo_dir, self.settings.keys_dir,
                                            self.settings.repo_settings)
                logger.info("re-signed timestamp (version %d)", version)
            except EdgeshipError as e:
                logger.error("timestamp refresh failed: %s", e)
