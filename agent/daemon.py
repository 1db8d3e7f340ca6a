"""The agent process: MQTT session, update worker, local API, telemetry.

Threads: paho's network loop (hands messages over), a dispatcher (control messages), an
update worker (one update at a time, newest announcement per model wins), the HTTP API,
and a telemetry ticker. Serving never waits on the network.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable

from edgeship.agent import __version__, protocol
from edgeship.agent.capabilities import Capabilities, Plan, detect, machine, plan
from edgeship.agent.config import AgentConfig
from edgeship.agent.errors import EdgeshipError, ProtocolError, Reason
from edgeship.agent.health import HealthLimits
from edgeship.agent.local_api import LocalApi
from edgeship.agent.metrics import AgentCollector, Metrics
from edgeship.agent.protocol import StatusEvent, Topics
from edgeship.agent.sdnotify import SdNotifier
from edgeship.agent.serving import ModelServer
from edgeship.agent.spool import SpoolSettings
from edgeship.agent.store import ModelStore
from edgeship.agent.telemetry import TelemetryService, TelemetrySettings
from edgeship.agent.trust import DesiredVerifier
from edgeship.agent.update.desired import DesiredTracker
from edgeship.agent.update.download import Downloader
from edgeship.agent.update.driver import UpdateDriver
from edgeship.agent.update.fetcher_base import FetcherInterface
from edgeship.agent.update.observer import NO_OBSERVER, InstallObserver
from edgeship.agent.update.planner import Do, Planner
from edgeship.agent.update.records import RecordStore
from edgeship.agent.update.settings import DeviceTraits, InstallSettings
from edgeship.agent.update.steps import Steps
from edgeship.agent.update.transfer import MqttFetcher, TransferClient, TransferSettings
from edgeship.agent.update.worker import UpdateWorker
from edgeship.common.mqtt import Message, MqttSession, SessionSettings, TlsSettings
from edgeship.common.mqtt_loop import SharedLoop

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
                        hardware_classes=(profile.arch, profile.name),
                        latency_scale=profile.latency_scale,
                        use_measurements=profile.uses_measurements,
                        memory_budget_mb=profile.model_memory_budget_mb)


def install_settings(cfg: AgentConfig) -> InstallSettings:
    """Trial window, loop breakers and health-check limits from the config."""
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


def llm_frontend(cfg: AgentConfig, server: ModelServer) -> Any:
    """The OpenAI-compatible front end with the config's admission bounds (built by the
    server on first use: see ``ModelServer.configure_llm``)."""
    from edgeship.agent.llm.http import configure
    return configure(server, max_active=cfg.llm_max_active, max_queued=cfg.llm_max_queued,
                     queue_timeout_s=cfg.llm_queue_timeout_s)


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``): what start-up
    freed (config, imports, the models' loading) would otherwise stay in the agent's RSS
    (~0.7 MB). A no-op where the C library has no ``malloc_trim`` (musl, macOS)."""
    import ctypes  # numpy and onnxruntime have loaded it already
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


class Agent:
    def __init__(self, cfg: AgentConfig, *, mqtt_loop: SharedLoop | None = None,
                 observer: InstallObserver = NO_OBSERVER) -> None:
        """``mqtt_loop``: drive this agent's MQTT socket from a loop shared with other
        agents in the process (the fleet bench); None: paho's own network thread.
        ``observer``: sees each point of each install state (tests plug fault plans in)."""
        self.cfg = cfg
        self.device = cfg.device_id
        self.traits = device_traits(cfg)
        self.server = ModelServer()
        self.server.ready = False  # until the models on disk are loaded
        self.server.quality = quality_hub(cfg)
        self.server.configure_llm(functools.partial(llm_frontend, cfg))
        self.store = ModelStore(cfg.models_dir)
        self._inbox: queue.Queue[Message | str] = queue.Queue(maxsize=INBOX_MAX)
        self.desired = DesiredTracker(cfg.state_dir,
                                      verify=DesiredVerifier(cfg.tuf_dir / "root.json",
                                                             self.device))
        self._stop = threading.Event()
        self.dropped_messages = 0
        self.rejected_messages = 0
        self._connected_at: float | None = None  # this connection's start, in presence
        #: also told each status event (``agent install`` prints them as they happen)
        self.report_hooks: list[Callable[[StatusEvent, dict[str, Any]], None]] = []
        self.session = MqttSession(self._session_settings(), on_message=self._on_message,
                                   on_connect=lambda: self._hand_over("connected"),
                                   loop=mqtt_loop)
        self.transfers = TransferClient(self.device, self.session.publish, TransferSettings(
            chunk_bytes=cfg.chunk_bytes, request_timeout_s=cfg.transfer_timeout_s,
            max_bytes_per_s=cfg.transfer_max_bytes_per_s))
        self.updates = self._update_driver(observer)
        self.worker = UpdateWorker(self.updates, Planner(self.device, self.desired,
                                                         max_models=cfg.max_models),
                                   self.desired, self._stop,
                                   retry_min_s=cfg.resource_retry_min_s,
                                   retry_max_s=max(cfg.resource_retry_min_s,
                                                   cfg.resource_retry_max_s))
        self._init_runtime_services()
        self._threads: list[threading.Thread] = []

    def _update_driver(self, observer: InstallObserver) -> UpdateDriver:
        cfg = self.cfg
        settings = install_settings(cfg)
        downloader = Downloader(
            tuf_dir=cfg.tuf_dir, downloads_dir=cfg.downloads_dir, store=self.store,
            fetcher=self._fetcher(), traits=self.traits, report=self.report,
            max_model_bytes=cfg.max_model_bytes,
            base_url=cfg.http_base_url if cfg.transport == "http" else MqttFetcher.PREFIX)
        steps = Steps(server=self.server, traits=self.traits, settings=settings,
                      report=self.report, stopping=threading.Event())
        return UpdateDriver(store=self.store, records=RecordStore(cfg.updates_dir),
                            server=self.server, downloader=downloader, steps=steps,
                            report=self.report, settings=settings, observer=observer)

    def _fetcher(self) -> FetcherInterface:
        """The update transport from the config: MQTT (the fleet server, the default) or
        HTTP(S) from ``http_base_url`` (a CDN or any static file server)."""
        cfg = self.cfg
        if cfg.transport == "http":
            from edgeship.agent.update.http_fetch import HttpFetcher  # urllib3 only when configured
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
        self.local_api = LocalApi(cfg, self.server, self.metrics.text,
                                  health_info=lambda: {"mqtt": self.session.state()},
                                  install_archive=self.install_archive)
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
        return SessionSettings(url=cfg.mqtt_url,
                               client_id=cfg.mqtt_client_id or f"edgeship-agent-{self.device}",
                               tls=tls, will=will, reconnect_min_s=cfg.reconnect_min_s,
                               reconnect_max_s=cfg.reconnect_max_s,
                               username=cfg.mqtt_username, password=cfg.mqtt_password())

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if not (self.cfg.tuf_dir / "root.json").exists():
            raise EdgeshipError(f"no pinned TUF root at {self.cfg.tuf_dir / 'root.json'}: "
                                "provision the device first", reason_code=Reason.CONFIG_INVALID)
        self.updates.recover()
        for model, version in self.desired.items():  # finish what the fleet last asked
            self.worker.want(model, version)
        self.local_api.start()  # answers "not ready" until the models below are loaded
        for m in self.updates.load_active():
            logger.info("serving %s v%s (%s) from disk", m.model, m.version, m.variant.id)
        self.server.ready = True
        if self.cfg.metrics_port:
            self.metrics.serve(self.cfg.api_host, self.cfg.metrics_port)
        self.session.start([(Topics.RELEASES_FILTER, 1),
                            (Topics.device_releases_filter(self.device), 1),
                            (Topics.transfer_response(self.device), 1),
                            (Topics.desired(self.device), 1)])
        self.telemetry.start()
        if self.server.quality is not None:
            self.server.quality.start()
        loops = [(self._dispatch_loop, "dispatch"), (self.worker.run, "update")]
        if self.notifier.watchdog_s:
            loops.append((self._watchdog_loop, "watchdog"))
        for target, name in loops:
            t = threading.Thread(target=target, name=f"edgeship-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        self.notifier.ready(f"serving {len(self.server.models())} model(s)")
        release_free_heap()

    def stop(self) -> None:
        self._stop.set()
        self.updates.stop()
        self.updates.fetcher.stop()  # HttpFetcher: end a download now
        self.worker.wake()
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
            self._connected_at = time.time()  # tells the fleet this is a new connection
            self.session.publish(Topics.presence(self.device), self._presence(True),
                                 retain=True)
            self.telemetry.forwarder.wake()  # drain what piled up while offline
            return
        assert isinstance(item, Message)
        try:
            parsed = protocol.parse_topic(item.topic)
            kind = parsed.kind
            if kind == "release":
                ann = protocol.ReleaseAnnouncement.from_bytes(item.payload)
                self.worker.announced(ann, resent=parsed.device is not None)
            elif kind == "desired":
                self.worker.desired_state(protocol.DesiredState.from_bytes(item.payload))
        except ProtocolError as e:
            self.rejected_messages += 1
            logger.warning("rejected message on %s: %s", item.topic, e)
            self.report(StatusEvent.REJECTED, reason=e.reason_code.value, detail=str(e)[:300],
                        topic=item.topic)

    # --- outbound -------------------------------------------------------------------------

    def report(self, event: StatusEvent, **fields: Any) -> None:
        """Publish a status event (QoS 1; paho queues it while offline)."""
        payload = protocol.status_event(self.device, event, ts=time.time(), **fields)
        self.session.publish(Topics.status(self.device), payload)
        if event == StatusEvent.SERVING:
            self.session.publish(Topics.presence(self.device), self._presence(True),
                                 retain=True)
        for hook in self.report_hooks:
            hook(event, fields)

    # --- air-gapped updates ----------------------------------------------------------------

    def install_archive(self, path: Path, *, remove_after: bool = False) -> dict[str, Any]:
        """A signed release archive (``edgeship agent install FILE``): its version goes to
        the update worker like an announcement, and its download reads the archive through
        the same TUF client, checks, lifecycle, health check and rollback. What the planner
        refuses (an older version, a blocked one) is refused here at once, reported as the
        worker would, with the same reason code."""
        from edgeship.agent.archive import ReleaseArchive  # tarfile: only when one arrives
        archive = ReleaseArchive(path)  # BundleError: not a release archive
        # the copy `agent install` left in the agent's inbox goes once it is read
        remove_after = remove_after or path.parent == self.cfg.state_dir / "inbox"
        model, version = archive.index.model, archive.index.version
        steps = Planner(self.device, self.desired).plan(model, version,
                                                        self.worker.device_view(model))
        doc: dict[str, Any] = {"model": model, "version": version,
                               "steps": [s.do.value for s in steps]}
        logger.info("release archive %s: %s v%d, plan %s", path, model, version, doc["steps"])
        if steps and steps[0].do != Do.REJECT:
            self.updates.downloader.offer(archive, remove_after=remove_after)
            self.worker.want(model, version)
            return doc
        archive.close()
        if remove_after:
            path.unlink(missing_ok=True)
        if steps:  # a refusal: the worker's own report of it
            self.worker.do(model, steps[0])
            doc.update(reason=str(steps[0].reason), detail=steps[0].detail)
        return doc

    def install_archive_now(self, path: Path) -> tuple[str, int]:
        """The same with no agent running (and no broker): recover, load what is installed,
        and carry out the plan for the archive's version on this thread."""
        if not (self.cfg.tuf_dir / "root.json").exists():
            raise EdgeshipError(f"no pinned TUF root at {self.cfg.tuf_dir / 'root.json'}: "
                                "provision the device first", reason_code=Reason.CONFIG_INVALID)
        self.updates.recover()
        self.updates.load_active()
        from edgeship.agent.archive import ReleaseArchive
        archive = ReleaseArchive(path)
        self.updates.downloader.offer(archive)
        model, version = archive.index.model, archive.index.version
        for step in self.worker.plan_now(model, version):
            self.worker.do(model, step)
        archive.close()  # (already closed when a download read it)
        return model, version

    def _presence(self, online: bool) -> bytes:
        models = {}
        if online:
            for lm in self.server.models():
                models[lm.installed.model] = {"version": lm.installed.version,
                                              "variant": lm.installed.variant.id}
        return protocol.encode("presence", {
            "device": self.device, "online": online, "ts": time.time(),
            "agent_version": __version__, "profile": self.cfg.profile,
            "arch": machine(), "api": self.api.url if online and self.api else None,
            # what this device really has (a Jetson without NVIDIA's build: CPU only)
            "runtimes": list(self.traits.runtimes), "providers": list(self.traits.providers),
            "models": models, "connected_at": self._connected_at if online else None})

    def _telemetry_extra(self) -> dict[str, Any]:
        """Agent facts for each telemetry record (cheap: counters and a directory read)."""
        records = self.updates.records.all()[:self.cfg.max_models]  # bounded, like models
        updates = {r.model: {"state": r.state.value, "version": r.version} for r in records}
        return {"agent_version": __version__, "profile": self.cfg.profile,
                "updates": updates, "announcements": dict(self.worker.planner.counters),
                "dropped_messages": self.dropped_messages,
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
