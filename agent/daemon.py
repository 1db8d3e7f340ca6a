"""The agent process: MQTT session, update worker, local API, telemetry.

Threads: paho's network loop (hands messages over), a dispatcher (control messages), an
update worker (one update at a time, newest announcement per model wins), the HTTP API,
and a telemetry ticker. Serving never waits on the network.
"""

from __future__ import annotations

import logging
import platform
import queue
import threading
import time
from typing import Any

from edgeship.agent import __version__, protocol
from edgeship.agent.capabilities import Capabilities, Plan, detect, plan
from edgeship.agent.config import AgentConfig
from edgeship.agent.desired import DesiredTracker, HeldVersions, reactivate_kept
from edgeship.agent.errors import EdgeshipError, ProtocolError, Reason
from edgeship.agent.lifecycle import RecordStore
from edgeship.agent.local_api import LocalApi
from edgeship.agent.mqtt import Message, MqttSession, SessionSettings, SharedLoop, TlsSettings
from edgeship.agent.protocol import Topics
from edgeship.agent.metrics import AgentCollector, Metrics
from edgeship.agent.sdnotify import SdNotifier
from edgeship.agent.serving import ModelServer
from edgeship.agent.store import ModelStore
from edgeship.agent.spool import SpoolSettings
from edgeship.agent.telemetry import TelemetryService, TelemetrySettings
from edgeship.agent.transfer import MqttFetcher, TransferClient, TransferSettings
from edgeship.agent import faults
from edgeship.agent.health import HealthLimits
from edgeship.agent.install import InstallSettings
from edgeship.agent.updater import DeviceTraits, UpdateManager

logger = logging.getLogger(__name__)

INBOX_MAX = 1000


def device_plan(cfg: AgentConfig, caps: Capabilities | None = None) -> tuple[Any, Plan]:
    """The profile, and what this device will use given what was detected on it."""
    from edgeship import devices
    profile = devices.load_profile(cfg.profile)
    caps = caps or detect()
    return profile, plan(caps, profile_providers=profile.execution_providers,
                         profile_runtimes=profile.runtimes,
                         profile_precisions=profile.preferred_precisions,
                         profile_threads=profile.threads, threads_override=cfg.threads)


def device_traits(cfg: AgentConfig, caps: Capabilities | None = None) -> DeviceTraits:
    profile, chosen = device_plan(cfg, caps)
    for note in chosen.notes:
        logger.info("device plan: %s", note)
    return DeviceTraits(arch=profile.arch, runtimes=chosen.runtimes,
                        preferred_precisions=chosen.precisions,
                        threads=chosen.threads, providers=chosen.providers,
                        latency_budget_ms=profile.latency_budget_ms,
                        hardware_classes=(profile.arch, profile.name))


def install_settings(cfg: AgentConfig) -> InstallSettings:
    """Issue 4: trial window, loop breakers and health-check limits from the config."""
    from edgeship import devices
    memory_mb = cfg.health_max_memory_mb or devices.load_profile(cfg.profile) \
        .model_memory_budget_mb
    return InstallSettings(
        trial_window_s=cfg.trial_window_s, trial_min_requests=cfg.trial_min_requests,
        trial_max_error_rate=cfg.trial_max_error_rate,
        trial_max_crashes=cfg.trial_max_crashes,
        max_update_restarts=cfg.max_update_restarts,
        health=HealthLimits(timeout_s=cfg.health_timeout_s, max_memory_mb=memory_mb))


def quality_hub(cfg: AgentConfig) -> Any:
    """Feedback, drift and the label-free estimate (None when ``quality_enabled`` is off)."""
    if not cfg.quality_enabled:
        return None
    from edgeship.agent.quality.hub import hub_for
    return hub_for(cfg.state_dir, cfg.quality_window_samples, cfg.feedback_memory_samples,
                   cfg.feedback_disk_samples)


class Agent:
    def __init__(self, cfg: AgentConfig, *, mqtt_loop: SharedLoop | None = None) -> None:
        """``mqtt_loop``: drive this agent's MQTT socket from a loop shared with other
        agents in the process (the fleet bench); None: paho's own network thread."""
        self.cfg = cfg
        self.device = cfg.device_id
        self.traits = device_traits(cfg)
        self.server = ModelServer()
        self.server.ready = False  # until the models on disk are loaded
        self.server.quality = quality_hub(cfg)
        self.store = ModelStore(cfg.models_dir)
        self._inbox: queue.Queue[Message | str] = queue.Queue(maxsize=INBOX_MAX)
        self._wanted: dict[str, int] = {}  # model -> newest announced version
        self._not_before: dict[str, float] = {}  # model -> monotonic start (announce spread)
        self._wanted_cv = threading.Condition()
        self.desired = DesiredTracker(cfg.state_dir)  # issue 6: per-device desired state
        self._stop = threading.Event()
        self.dropped_messages = 0
        self.rejected_messages = 0
        self.session = MqttSession(self._session_settings(), on_message=self._on_message,
                                   on_connect=lambda: self._hand_over("connected"),
                                   loop=mqtt_loop)
        self.transfers = TransferClient(self.device, self.session.publish, TransferSettings(
            chunk_bytes=cfg.chunk_bytes, request_timeout_s=cfg.transfer_timeout_s,
            max_bytes_per_s=cfg.transfer_max_bytes_per_s))
        self.updates = UpdateManager(
            tuf_dir=cfg.tuf_dir, downloads_dir=cfg.downloads_dir, store=self.store,
            records=RecordStore(cfg.updates_dir), server=self.server,
            fetcher=self._fetcher(),
            base_url=cfg.http_base_url if cfg.transport == "http" else MqttFetcher.PREFIX,
            traits=self.traits, report=self.report,
            max_model_bytes=cfg.max_model_bytes, settings=install_settings(cfg),
            faults=faults.from_env(), superseded=self._superseded)
        self.held = HeldVersions(self.updates)  # issue 6: all-or-none staging
        self._init_runtime_services()
        self._threads: list[threading.Thread] = []

    def _fetcher(self) -> Any:
        """Issue 3: the update transport from the config: MQTT (the fleet server, the
        default) or HTTP(S) from ``http_base_url`` (a CDN or any static file server)."""
        cfg = self.cfg
        if cfg.transport == "http":
            from edgeship.agent.http_fetch import HttpFetcher  # urllib3 only when configured
            return HttpFetcher(cfg.downloads_dir, timeout_s=cfg.transfer_timeout_s,
                               max_bytes_per_s=cfg.transfer_max_bytes_per_s)
        return MqttFetcher(self.transfers, resume_dir=cfg.downloads_dir)

    def _init_runtime_services(self) -> None:
        """Telemetry pipeline, metrics, local API (TCP and Unix socket), systemd notify."""
        cfg = self.cfg
        self.telemetry = TelemetryService(
            TelemetrySettings(device=self.device, topic=Topics.telemetry(self.device),
                              state_dir=cfg.state_dir, interval_s=cfg.telemetry_interval_s,
                              spool=SpoolSettings(cfg.spool_path, cfg.spool_max_records,
                                                  cfg.spool_max_dead_letters)),
            self.server, self.session, self._telemetry_extra)
        self.spool = self.telemetry.spool
        self.metrics = Metrics(AgentCollector(
            self.server, self.spool, lambda: self.telemetry.last_system,
            {"device": self.device, "agent_version": __version__, "profile": cfg.profile}))
        self.local_api = LocalApi(cfg, self.server, self.metrics.text)
        self.notifier = SdNotifier()

    @property
    def api(self) -> Any:
        """The HTTP API on TCP (None: off, or its port was taken)."""
        return self.local_api.tcp

    @property
    def unix_api(self) -> Any:
        return self.local_api.unix

    def _session_settings(self) -> SessionSettings:
        cfg = self.cfg
        tls = TlsSettings(cfg.tls_ca_file, cfg.tls_cert_file, cfg.tls_key_file) \
            if cfg.tls_ca_file else None
        will = (Topics.presence(self.device), self._presence(online=False), True)
        return SessionSettings(url=cfg.mqtt_url, client_id=f"edgeship-agent-{self.device}",
                               tls=tls, will=will, reconnect_min_s=cfg.reconnect_min_s,
                               reconnect_max_s=cfg.reconnect_max_s)

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if not (self.cfg.tuf_dir / "root.json").exists():
            raise EdgeshipError(f"no pinned TUF root at {self.cfg.tuf_dir / 'root.json'}: "
                                "provision the device first", reason_code=Reason.CONFIG_INVALID)
        self.updates.recover()
        for model, version in self.desired.items():  # finish what the fleet last asked
            self._want(model, version)
        self.local_api.start()  # answers "not ready" until the models below are loaded
        for m in self.updates.load_active():
            logger.info("serving %s v%s (%s) from disk", m.model, m.version, m.variant.id)
        self.server.ready = True
        if self.cfg.metrics_port:
            self.metrics.serve(self.cfg.api_host, self.cfg.metrics_port)
        self.session.start([(Topics.RELEASES_FILTER, 1),
                            (Topics.transfer_response(self.device), 1),
                            (Topics.desired(self.device), 1)])
        self.telemetry.start()
        if self.server.quality is not None:
            self.server.quality.start()
        loops = [(self._dispatch_loop, "dispatch"), (self._update_loop, "update")]
        if self.notifier.watchdog_s:
            loops.append((self._watchdog_loop, "watchdog"))
        for target, name in loops:
            t = threading.Thread(target=target, name=f"edgeship-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        self.notifier.ready(f"serving {len(self.server.models())} model(s)")

    def stop(self) -> None:
        self._stop.set()
        self.updates.stop()
        self.updates.fetcher.stop()  # HttpFetcher: end a download now
        with self._wanted_cv:
            self._wanted_cv.notify_all()
        self._hand_over("stop")
        self.notifier.stopping()
        self.local_api.stop()
        self.metrics.stop()
        self.telemetry.stop()
        if self.server.quality is not None:
            self.server.quality.stop()
        self.session.stop(final=(Topics.presence(self.device), self._presence(False), True))
        for t in self._threads:
            t.join(timeout=5)

    def wait(self) -> None:
        while not self._stop.wait(1.0):
            pass

    # --- inbound (paho's thread: hand over only) ------------------------------------------

    def _on_message(self, msg: Message) -> None:
        if msg.topic == Topics.transfer_response(self.device):
            self.transfers.on_response(msg)
        else:
            self._hand_over(msg)

    def _hand_over(self, item: Message | str) -> None:
        try:
            self._inbox.put_nowait(item)
        except queue.Full:
            self.dropped_messages += 1

    def _dispatch_loop(self) -> None:
        while not self._stop.is_set():
            item = self._inbox.get()
            if item == "stop":
                return
            try:
                self._dispatch(item)
            except Exception:  # never let one message take the agent down
                logger.exception("dispatch failed")

    def _dispatch(self, item: Message | str) -> None:
        if item == "connected":
            self.session.publish(Topics.presence(self.device), self._presence(True),
                                 retain=True)
            self.telemetry.forwarder.wake()  # drain what piled up while offline
            return
        assert isinstance(item, Message)
        try:
            kind = protocol.parse_topic(item.topic).kind
            if kind == "release":
                ann = protocol.ReleaseAnnouncement.from_bytes(item.payload)
                if not self.desired.governs(ann.model):  # else the rollout decides
                    self._spread(ann)
                    self._want(ann.model, ann.version)
            elif kind == "desired":
                self._on_desired(protocol.DesiredState.from_bytes(item.payload))
        except ProtocolError as e:
            self.rejected_messages += 1
            logger.warning("rejected message on %s: %s", item.topic, e)
            self.report("rejected", reason=e.reason_code.value, detail=str(e)[:300],
                        topic=item.topic)

    # --- updates --------------------------------------------------------------------------

    def _on_desired(self, desired: protocol.DesiredState) -> None:
        if not self.desired.accept(desired):  # redelivered or older: keep the newest
            logger.info("ignoring desired %s v%s (seq %s): not newer", desired.model,
                        desired.version, desired.seq)
            return
        self._want(desired.model, desired.version, exact=True)

    def _want(self, model: str, version: int, exact: bool = False) -> None:
        with self._wanted_cv:
            if exact or self.desired.governs(model) or version > self._wanted.get(model, 0):
                self._wanted[model] = version
                self._wanted_cv.notify()

    def _superseded(self, model: str, version: int) -> bool:
        """Another version of ``model`` is waiting (ends its running trial early): a newer
        one, or any other the fleet asked for (a rollout's rollback)."""
        with self._wanted_cv:
            wanted = self._wanted.get(model)
        return wanted is not None and (wanted > version or (
            wanted != version and self.desired.governs(model)))

    def _update_loop(self) -> None:
        self.updates.resume_pending()  # issue 4: finish updates a restart interrupted
        while not self._stop.is_set():
            with self._wanted_cv:
                while not self._wanted and not self._stop.is_set():
                    self._wanted_cv.wait(30.0)  # _want and stop notify; a safety net only
                if self._stop.is_set():
                    return
                model, version = self._wanted.popitem()
            if not self.desired.governs(model) and self._wait_spread(model, version):
                continue
            if self.desired.governs(model):
                self._apply_desired(model, self.desired.version(model) or version)
            else:
                self.updates.handle_announcement(model, version)

    def _spread(self, ann: protocol.ReleaseAnnouncement) -> None:
        """Issue 3: an announcement with ``spread_s`` starts this device's fetch at its own
        offset in the window (protocol.spread_delay_s)."""
        delay_s = protocol.spread_delay_s(self.device, ann.model, ann.version, ann.spread_s,
                                          ann.released_at, time.time())
        with self._wanted_cv:
            self._not_before[ann.model] = time.monotonic() + delay_s

    def _wait_spread(self, model: str, version: int) -> bool:
        """Wait out the announcement spread; True: skip this version (the agent stops, a
        newer version was announced, or a rollout took the model over meanwhile)."""
        with self._wanted_cv:
            delay_s = self._not_before.pop(model, 0.0) - time.monotonic()
        if delay_s <= 0:
            return False
        logger.info("announcement spread: fetching %s v%d in %.1fs", model, version, delay_s)
        if self._stop.wait(delay_s):
            return True
        with self._wanted_cv:
            return self._wanted.get(model, 0) > version or self.desired.governs(model)

    def _apply_desired(self, model: str, version: int) -> None:
        if self.desired.holds(model):  # all-or-none: stage, report held, wait for commit
            self.held.stage(model, version)
            return
        held = self.held.take(model, version)  # the commit (or a discard)
        active = self.store.active(model)
        if active is not None and active.version == version:
            return
        if active is not None and version < active.version and reactivate_kept(
                self.store, self.server, model=model, version=version,
                threads=self.traits.threads, providers=self.traits.providers,
                report=self.report):
            return
        self.updates.install(model, version, held=held)

    # --- outbound -------------------------------------------------------------------------

    def report(self, event: str, **fields: Any) -> None:
        """Publish a status event (QoS 1; paho queues it while offline)."""
        payload = protocol.status_event(self.device, event, ts=time.time(), **fields)
        self.session.publish(Topics.status(self.device), payload)
        if event in ("serving",):
            self.session.publish(Topics.presence(self.device), self._presence(True),
                                 retain=True)

    def _presence(self, online: bool) -> bytes:
        models = {}
        if online:
            for lm in self.server.models():
                models[lm.installed.model] = {"version": lm.installed.version,
                                              "variant": lm.installed.variant.id}
        return protocol.encode("presence", {
            "device": self.device, "online": online, "ts": time.time(),
            "agent_version": __version__, "profile": self.cfg.profile,
            "arch": platform.machine(), "api": self.api.url if online and self.api else None,
            "models": models})

    def _telemetry_extra(self) -> dict[str, Any]:
        """Agent facts for each telemetry record (cheap: counters and a directory read)."""
        updates = {r.model: {"state": r.state.value, "version": r.version}
                   for r in self.updates.records.all()}
        return {"agent_version": __version__, "profile": self.cfg.profile,
                "updates": updates, "dropped_messages": self.dropped_messages,
                "rejected_messages": self.rejected_messages,
                "mqtt": {"connected": self.session.connected,
                         "reconnects": self.session.reconnects}}

    def _watchdog_loop(self) -> None:
        """Ping systemd while the dispatcher and the API still run; a hang stops the pings
        and systemd restarts the agent."""
        interval_s = (self.notifier.watchdog_s or 2.0) / 2
        while not self._stop.wait(interval_s):
            if all(t.is_alive() for t in self._threads if t.name != "edgeship-watchdog"):
                self.notifier.watchdog()
