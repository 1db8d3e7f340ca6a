"""`edgeship demo`: the whole loop on one machine.

train → convert (fp32 + static int8, gated) → sign (TUF) → broker + fleet server + N agent
processes → release → each agent downloads over MQTT, verifies, installs, serves → the
held-out images go through every agent's local API → telemetry comes back over MQTT →
one table per device. Exits non-zero when any step fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.agent import protocol
from edgeship.agent.errors import ConfigError, EdgeshipError
from edgeship.common.mqtt import Message, MqttSession, SessionSettings
from edgeship.agent.protocol import Topics

DEMO_PROFILES = ("rpi4", "jetson-orin-nano", "generic-x86_64")
#: written into the work directory the demo creates: only such a directory is wiped again
WORK_MARKER = ".edgeship-demo-work-dir"


@dataclass(frozen=True)
class DemoSettings:
    work_dir: Path
    agents: int = 3
    epochs: int = 15
    telemetry_interval_s: float = 2.0
    serve_timeout_s: float = 120.0
    mqtt_url: str | None = None
    keep: bool = False


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole loop end to end on this machine")
    p.add_argument("--work-dir", type=Path, default=Path(".edgeship-demo"),
                   help="where keys, repository, bundles and device states go "
                        "(wiped at start)")
    p.add_argument("--agents", type=int, default=3, help="number of agent processes")
    p.add_argument("--epochs", type=int, default=15, help="training epochs")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    if args.agents < 1:
        raise ConfigError("--agents must be >= 1", key="agents")
    check_work_dir(args.work_dir)
    settings = DemoSettings(work_dir=args.work_dir.resolve(), agents=args.agents,
                            epochs=args.epochs, mqtt_url=os.environ.get("EDGESHIP_MQTT_URL"))
    result = Demo(settings, quiet=args.json).run()
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        result.print_table()
    return 0 if result.ok else 1


def check_work_dir(work: Path) -> None:
    """The demo wipes its work directory at start: only one it made itself (the marker is
    there), or a new or empty one — never a directory of the user's."""
    if work.exists() and not work.is_dir():
        raise ConfigError(f"--work-dir {work} is a file, not a directory", key="work_dir")
    if work.is_dir() and any(work.iterdir()) and not (work / WORK_MARKER).exists():
        raise ConfigError(f"--work-dir {work} is not empty and was not made by 'edgeship "
                          "demo': refusing to delete it (give a new or empty directory)",
                          key="work_dir")


# --- observing the fleet over MQTT --------------------------------------------------------

class Observer:
    """Collects presence, status and telemetry from every device (its own MQTT session)."""

    def __init__(self, url: str) -> None:
        self.events: list[dict[str, Any]] = []
        self.telemetry: list[dict[str, Any]] = []
        self.presence: dict[str, dict[str, Any]] = {}
        self.session = MqttSession(SessionSettings(url=url, client_id=f"edgeship-demo-"
                                                   f"{os.getpid()}", clean_start=True,
                                                   session_expiry_s=0), self._on_message)

    def start(self) -> None:
        self.session.start([(Topics.DEVICE_STATUS_FILTER, 1),
                            (Topics.DEVICE_TELEMETRY_FILTER, 1),
                            (Topics.DEVICE_PRESENCE_FILTER, 1)])
        if not self.session.wait_subscribed(10):
            raise EdgeshipError(f"cannot connect to the broker at {self.session.settings.url}")

    def _on_message(self, msg: Message) -> None:  # paho's thread: append only
        try:
            doc = protocol.decode(msg.payload, max_bytes=1 << 20)
        except EdgeshipError:
            return
        kind = protocol.parse_topic(msg.topic).kind
        if kind == "status":
            self.events.append(doc)
        elif kind == "telemetry":
            self.telemetry.append(doc)
        elif kind == "presence":
            self.presence[doc.get("device", "?")] = doc

    def serving(self, device: str, model: str, version: int) -> dict[str, Any] | None:
        for e in list(self.events):
            if (e.get("device"), e.get("event"), e.get("model"), e.get("version")) == \
                    (device, "serving", model, version):
                return e
        return None

    def failures(self, device: str) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e.get("device") == device
                and e.get("event") in ("failed", "rejected")]

    def latest_telemetry(self, device: str, model: str) -> dict[str, Any] | None:
        for t in reversed(list(self.telemetry)):
            m = t.get("models", {}).get(model)
            if t.get("device") == device and m and m.get("requests", 0) > 0:
                return m
        return None


# --- the demo -----------------------------------------------------------------------------

@dataclass
class DeviceRow:
    device: str
    profile: str
    version: int | None = None
    variant: str | None = None
    accuracy: float | None = None
    expected_accuracy: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    release_to_serving_s: float | None = None
    requests: int = 0
    error: str | None = None


@dataclass
class DemoResult:
    rows: list[DeviceRow] = field(default_factory=list)
    steps: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None
    variants: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.rows) and all(
            r.error is None for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "error": self.error, "steps": dict(self.steps),
                "variants": self.variants, "devices": [r.__dict__ for r in self.rows]}

    def print_table(self) -> None:
        from rich.console import Console
        from rich.table import Table

        console = Console(width=max(Console().width, 150))
        t = Table(title="edgeship demo: one row per device")
        for col in ("device", "profile", "version", "variant", "accuracy (held-out)",
                    "converter said", "p50 ms", "p99 ms", "release→serving s", "status"):
            t.add_column(col)
        fmt = lambda v, f: "-" if v is None else f.format(v)  # noqa: E731
        for r in self.rows:
            t.add_row(r.device, r.profile, fmt(r.version, "v{}"), r.variant or "-",
                      fmt(r.accuracy and r.accuracy * 100, "{:.2f}%"),
                      fmt(r.expected_accuracy and r.expected_accuracy * 100, "{:.2f}%"),
                      fmt(r.p50_ms, "{:.3f}"), fmt(r.p99_ms, "{:.3f}"),
                      fmt(r.release_to_serving_s, "{:.2f}"),
                      "[green]ok[/]" if r.error is None else f"[red]{r.error}[/]")
        console.print(t)
        console.print("steps: " + ", ".join(f"{n} {s:.1f}s" for n, s in self.steps))
        if self.error:
            console.print(f"[red]demo failed: {self.error}[/]")


class Demo:
    def __init__(self, settings: DemoSettings, quiet: bool = False) -> None:
        self.s = settings
        self.quiet = quiet
        self.procs: list[subprocess.Popen] = []
        self.broker = None
        self.result = DemoResult()

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"==> {text}", flush=True)

    def run(self) -> DemoResult:
        try:
            self._run()
        except EdgeshipError as e:
            self.result.error = str(e)
        finally:
            self._shutdown()
        return self.result

    def _timed(self, name: str, fn, *args):
        start = time.monotonic()
        out = fn(*args)
        self.result.steps.append((name, time.monotonic() - start))
        return out

    def _run(self) -> None:
        work = self.s.work_dir
        check_work_dir(work)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        (work / WORK_MARKER).write_text("made by 'edgeship demo'; deleted by the next run\n")
        self.say(f"training the digits CNN ({self.s.epochs} epochs)")
        trained = self._timed("train", self._train)
        self.say(f"torch held-out accuracy {trained.test_accuracy * 100:.2f}%; converting")
        conv = self._timed("convert", self._convert, trained)
        self.say("signing: TUF keys and repository")
        self._timed("sign", self._init_repo)
        url = self._timed("broker", self._start_broker)
        self.say(f"broker at {url}; starting the fleet server and {self.s.agents} agents")
        observer = Observer(url)
        observer.start()
        self._timed("start", self._start_processes, url, observer)
        self.say("releasing the bundle to the fleet")
        released_at = self._timed("release", self._release, conv, url)
        self._timed("rollout", self._wait_serving, observer, conv.manifest, released_at)
        self.say("sending the held-out images through every agent's local API")
        self._timed("infer", self._infer_all, trained.data, conv.manifest)
        self._timed("telemetry", self._collect_telemetry, observer, conv.manifest)
        observer.session.stop()

    def _train(self):
        from edgeship.converter.cli import _quiet_foreign_noise
        from edgeship.converter.digits import train_digits
        _quiet_foreign_noise()
        return train_digits(epochs=self.s.epochs)

    def _convert(self, trained):
        from edgeship.converter.pipeline import convert_digits
        result = convert_digits(self.s.work_dir / "bundle", version=1, trained=trained,
                                progress=not self.quiet)
        self.result.variants = [r.to_dict() for r in result.reports]
        for r in result.reports:
            m = r.metrics
            self.say(f"  {r.id:10} {'PASS' if r.passed else 'FAIL'} accuracy "
                     f"{m.accuracy * 100:.2f}% size {m.size_bytes / 1024:.1f} KiB p50 "
                     f"{m.latency_p50_ms:.3f} ms")
        return result

    def _init_repo(self) -> None:
        from edgeship.fleet.tuf_repo import init_repository
        init_repository(self.s.work_dir / "keys", self.s.work_dir / "repo")

    def _start_broker(self) -> str:
        if self.s.mqtt_url:
            return self.s.mqtt_url
        from edgeship.fleet.broker import Mosquitto
        self.broker = Mosquitto().start()
        return self.broker.url

    def _spawn(self, args: list[str], log: Path) -> subprocess.Popen:
        out = open(log, "wb")
        proc = subprocess.Popen([sys.executable, "-m", "edgeship", *args], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def _start_processes(self, url: str, observer: Observer) -> None:
        from edgeship.fleet.broker import free_port
        work = self.s.work_dir
        self._spawn(["fleet", "serve", "--mqtt", url, "--repo", str(work / "repo"),
                     "--db", str(work / "fleet.db")], work / "fleet.log")
        self.devices: dict[str, tuple[str, int]] = {}
        for i in range(self.s.agents):
            device = f"demo-{i + 1}"
            profile = DEMO_PROFILES[i % len(DEMO_PROFILES)]
            port = free_port()
            cfg = write_agent_config(work / "devices" / device, device, url, profile, port,
                                     self.s.telemetry_interval_s, work / "repo")
            self._spawn(["agent", "run", "--config", str(cfg)], work / f"{device}.log")
            self.devices[device] = (profile, port)
            self.result.rows.append(DeviceRow(device, profile))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self._check_alive()
            if all(observer.presence.get(d, {}).get("online") for d in self.devices):
                return
            time.sleep(0.1)
        raise EdgeshipError("agents did not come online within 30s (see *.log in "
                            f"{work})")

    def _check_alive(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                raise EdgeshipError(f"process {' '.join(p.args[3:5])} exited with "
                                    f"{p.returncode} (logs in {self.s.work_dir})")

    def _release(self, conv, url: str) -> float:
        from edgeship.fleet.tuf_repo import release_bundle
        info = release_bundle(conv.bundle_dir, self.s.work_dir / "repo",
                              self.s.work_dir / "keys")
        session = MqttSession(SessionSettings(url=url, client_id=f"edgeship-release-"
                                              f"{os.getpid()}", clean_start=True,
                                              session_expiry_s=0), lambda m: None)
        session.start()
        session.wait_connected(10)
        ann = protocol.ReleaseAnnouncement(info.model, info.version, info.released_at)
        session.publish_acked(Topics.release(info.model), ann.to_bytes(), retain=True,
                              timeout_s=10)
        session.stop()
        return info.released_at

    def _wait_serving(self, observer: Observer, manifest, released_at: float) -> None:
        deadline = time.monotonic() + self.s.serve_timeout_s
        pending = {r.device: r for r in self.result.rows}
        while pending and time.monotonic() < deadline:
            self._check_alive()
            for device, row in list(pending.items()):
                ev = observer.serving(device, manifest.model, manifest.version)
                if ev is not None:
                    row.version, row.variant = ev["version"], ev.get("variant")
                    row.release_to_serving_s = ev["ts"] - released_at
                    row.expected_accuracy = manifest.variant(row.variant).metrics.get(
                        "accuracy")
                    self.say(f"  {device} serves v{row.version} ({row.variant}) after "
                             f"{row.release_to_serving_s:.2f}s")
                    del pending[device]
                elif fails := observer.failures(device):
                    row.error = f"{fails[-1].get('reason')}: {fails[-1].get('detail', '')}"
                    del pending[device]
            time.sleep(0.05)
        for row in pending.values():
            row.error = f"not serving after {self.s.serve_timeout_s:.0f}s"
        if any(r.error for r in self.result.rows):
            raise EdgeshipError("not every device is serving the release")

    def _infer_all(self, data, manifest) -> None:
        for row in self.result.rows:
            port = self.devices[row.device][1]
            preds = [np.argmax(predict(port, manifest.model, x[None])) for x in data.x_test]
            row.accuracy = float(np.mean(np.asarray(preds) == data.y_test))
            row.requests = len(preds)
            if row.expected_accuracy is not None and \
                    abs(row.accuracy - row.expected_accuracy) > 0.01:
                row.error = (f"accuracy {row.accuracy:.4f} differs from the converter's "
                             f"{row.expected_accuracy:.4f} by more than 1 point")

    def _collect_telemetry(self, observer: Observer, manifest) -> None:
        deadline = time.monotonic() + 6 * self.s.telemetry_interval_s + 5
        for row in self.result.rows:
            while time.monotonic() < deadline:
                t = observer.latest_telemetry(row.device, manifest.model)
                if t is not None:
                    row.p50_ms = t["latency_ms"]["p50"]
                    row.p99_ms = t["latency_ms"]["p99"]
                    break
                time.sleep(0.1)
            else:
                row.error = row.error or "no telemetry received"

    def _shutdown(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        if self.broker is not None:
            self.broker.cleanup()


def write_agent_config(state_dir: Path, device: str, url: str, profile: str, port: int,
                       telemetry_interval_s: float, repo_dir: Path) -> Path:
    """Provision a device directory: pinned TUF root and an agent TOML config."""
    (state_dir / "tuf").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(repo_dir / "metadata" / "1.root.json", state_dir / "tuf" / "root.json")
    cfg = state_dir / "agent.toml"
    cfg.write_text(f'[agent]\ndevice_id = "{device}"\nstate_dir = "{state_dir}"\n'
                   f'mqtt_url = "{url}"\nprofile = "{profile}"\napi_port = {port}\n'
                   f"telemetry_interval_s = {telemetry_interval_s}\n")
    return cfg


def predict(port: int, model: str, x: np.ndarray) -> np.ndarray:
    body = json.dumps({"inputs": x.tolist()}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models/{model}/predict",
                                 data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        doc = json.loads(resp.read())
    return np.asarray(next(iter(doc["outputs"].values())))
