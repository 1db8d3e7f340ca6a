"""The soak's fleet: a locked-down Mosquitto (TLS, client certificates, ACLs from
``edgeship broker config``), a signed repository, ``edgeship fleet serve`` and real
``edgeship agent run`` processes, each with its own certificate — plus the clients the
attacks speak through: ``mallory`` (a device certificate, what a stolen or hostile device
has), a second fleet identity (what a buggy fleet component could send) and an operator
that watches every status event and telemetry message."""

from __future__ import annotations

import getpass
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from edgeship.common.mqtt import Message, MqttSession, SessionSettings, TlsSettings
from edgeship.agent.protocol import DesiredState, ReleaseAnnouncement, Topics
from edgeship.fleet.broker import Mosquitto, free_port
from edgeship.fleet.broker_config import write_broker_config
from edgeship.fleet.pki import CertificateAuthority, Issued
from edgeship.fleet.tuf_repo import init_repository, online_signer, release_bundle
from tests.support import models
from tests.support.agent_process import served, write_config
from tests.support.attacks import RawDevice

ROOT = Path(__file__).resolve().parents[1]
MODEL = "soak"


def process_usage(pid: int) -> tuple[float, int]:
    """(RSS in MiB, open file descriptors) of a live process, from /proc."""
    rss_kb = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss_kb = int(line.split()[1])
    return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))


class Watcher:
    """The operator's view: every status event and the newest telemetry per device."""

    def __init__(self, url: str, tls: TlsSettings) -> None:
        self.events: list[dict[str, Any]] = []
        self.telemetry_bytes: dict[str, int] = {}
        self.telemetry: dict[str, dict[str, Any]] = {}  # the newest per device
        self._cv = threading.Condition()
        self.session = MqttSession(SessionSettings(url=url, client_id="ops:soak",
                                                   clean_start=True, session_expiry_s=0,
                                                   tls=tls), self._on_message)
        self.session.start([(Topics.DEVICE_STATUS_FILTER, 1),
                            (Topics.DEVICE_TELEMETRY_FILTER, 1)])
        if not self.session.wait_subscribed(15):
            raise RuntimeError("the operator session could not subscribe")

    def _on_message(self, msg: Message) -> None:
        device = msg.topic.split("/")[3]
        with self._cv:
            if msg.topic.endswith("/telemetry"):
                self.telemetry_bytes[device] = len(msg.payload)
                try:
                    self.telemetry[device] = json.loads(msg.payload)
                except ValueError:
                    pass
                return
            try:
                self.events.append(json.loads(msg.payload))
            except ValueError:
                return
            self._cv.notify_all()

    def mark(self) -> int:
        with self._cv:
            return len(self.events)

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], since: int,
                 timeout_s: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while True:
                for e in self.events[since:]:
                    if pred(e):
                        return e
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cv.wait(left)


class SoakEnv:
    """Everything the soak runs against; ``close()`` stops it all."""

    def __init__(self, root: Path, agents: int = 2, disk_agent: bool = True) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}
        self.ca = CertificateAuthority.init(root / "ca")
        self.certs = root / "certs"
        fleet = self.ca.issue("fleet", "soak", self.certs)
        voice = self.ca.issue("fleet", "soak-voice", self.certs)
        ops = self.ca.issue("operator", "soak", self.certs)
        port = free_port()
        conf, _ = write_broker_config(root / "broker", self.ca, port=port, bind="127.0.0.1",
                                      hosts=("localhost", "127.0.0.1"),
                                      persistence_dir=root / "broker",
                                      run_as_user=getpass.getuser())
        self.broker = Mosquitto(port=port, config_text=conf.read_text(), tls=True).start()
        self.url = self.broker.url
        self.keys, self.repo = root / "keys", root / "repo"
        init_repository(self.keys, self.repo)
        self.metrics_port = free_port()
        self._start_fleet(fleet)
        self.watcher = Watcher(self.url, self.tls(ops))
        self.voice = RawDevice(self.url, "fleet:soak-voice", tls=self.tls(voice),
                               client_id="fleet:soak-voice")
        self.mallory = RawDevice(self.url, "mallory",
                                 tls=self.tls(self.ca.issue("device", "mallory", self.certs)))
        self.probe = RawDevice(self.url, "probe",
                               tls=self.tls(self.ca.issue("device", "probe", self.certs)))
        self.devices = [f"soak-{i}" for i in range(agents)]
        self.disk_device = "soak-disk" if disk_agent and self._small_disk("soak-disk") \
            else None
        if self.disk_device:
            self.devices.append(self.disk_device)
        self.ports: dict[str, int] = {}
        for device in self.devices:
            self._start_agent(device)
        self._signer: Any = None
        self._epoch = 0
        self.released = 0  # the newest version signed into the repository
        self.expected = 0  # what every agent must serve

    def _small_disk(self, device: str) -> bool:
        """The state of ``device`` on its own 32 MiB tmpfs (root only), to fill it up."""
        state = self.root / "devices" / device
        state.mkdir(parents=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(state)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            print(f"no disk-full agent: cannot mount a tmpfs ({done.stderr.strip()})")
        return done.returncode == 0

    def tls(self, issued: Issued) -> TlsSettings:
        return TlsSettings(str(self.ca.cert_path), str(issued.cert_path),
                           str(issued.key_path))

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen([sys.executable, "-m", "edgeship.cli", *argv],
                                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
        log.close()

    def _start_fleet(self, fleet: Issued) -> None:
        self._spawn("fleet", ["fleet", "serve", "--mqtt", self.url, "--repo", str(self.repo),
                              "--db", str(self.root / "fleet.db"), "--keys", str(self.keys),
                              "--http-port", str(self.metrics_port),
                              "--tls-ca", str(self.ca.cert_path),
                              "--tls-cert", str(fleet.cert_path),
                              "--tls-key", str(fleet.key_path)])

    def _start_agent(self, device: str) -> None:
        issued = self.ca.issue("device", device, self.certs)
        state = self.root / "devices" / device
        cfg = write_config(state, device, self.url, self.repo, api_socket=str(
                               state / "api.sock"), tls_ca_file=str(self.ca.cert_path),
                           tls_cert_file=str(issued.cert_path),
                           tls_key_file=str(issued.key_path), trial_window_s=0.0,
                           telemetry_interval_s=2.0, resource_retry_min_s=1.0,
                           resource_retry_max_s=5.0)
        self.ports[device] = int(next(line.split("=")[1] for line in
                                      cfg.read_text().splitlines()
                                      if line.startswith("api_port")))
        self._spawn(device, ["agent", "run", "--config", str(cfg)])

    # --- releases and checks ----------------------------------------------------------

    def release(self, edit: Callable[[Path], None] | None = None,
                model: str = MODEL) -> int:
        """Sign the next version of the soak model (``edit`` may change its bundle first)
        and announce it, as the fleet would."""
        version = self.released + 1 if model == MODEL else 1
        bundle = models.write_bundle(self.root / "bundles" / f"{model}-{version}", model,
                                     version, models.good(version))
        if edit is not None:
            edit(bundle)
        release_bundle(bundle, self.repo, self.keys)
        if model == MODEL:
            self.released = version
        self.voice.publish(Topics.release(model), ReleaseAnnouncement(
            model, version, time.time()).to_bytes(), retain=True)
        return version

    def sign_desired(self, device: str, desired: DesiredState) -> DesiredState:
        """What the fleet server does with its online timestamp key."""
        if self._signer is None:
            self._signer = online_signer(self.repo, self.keys)
            self._epoch = int(time.time() * 1000)
        desired = replace(desired, epoch=self._epoch)
        sig = self._signer.sign(desired.signing_bytes(device))
        return replace(desired, sig=(sig.keyid, sig.signature))

    def socket_url(self, device: str) -> str:
        return f"unix://{self.root / 'devices' / device / 'api.sock'}"

    def serving(self, device: str, model: str = MODEL) -> int | None:
        doc = served(self.ports[device], model)
        return doc.get("version") if doc else None

    def wait_all_serving(self, version: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while any(self.serving(d) != version for d in self.devices):
            if time.monotonic() > deadline:
                logs = {d: (self.root / f"{d}.log").read_text()[-600:] for d in self.devices
                        if self.serving(d) != version}
                raise RuntimeError(f"agents did not all serve v{version} within {timeout_s}s: "
                                   f"{ {d: self.serving(d) for d in self.devices} }; {logs}")
            time.sleep(0.2)
        self.expected = version

    def fleet_counter(self, name: str) -> float:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(f"edgeship_fleet_{name}_total "):
                    return float(line.split()[1])
        raise KeyError(name)

    def wait_fleet_http(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.fleet_counter("records")
                return
            except (OSError, KeyError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def usage(self) -> dict[str, tuple[float, int]]:
        return {name: process_usage(p.pid) for name, p in self.procs.items()
                if p.poll() is None}

    def dead(self) -> list[str]:
        return [name for name, p in self.procs.items() if p.poll() is not None]

    def close(self) -> None:
        for session in (self.voice, self.mallory, self.probe):
            session.close()
        self.watcher.session.stop()
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        self.broker.cleanup()
        if self.disk_device:
            subprocess.run(["umount", "-l", str(self.root / "devices" / self.disk_device)],
                           capture_output=True)

