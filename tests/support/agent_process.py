"""Agents for the safe-install tests: configs, in-process agents and real agent processes
that the tests kill with SIGKILL; checks of what a restarted agent serves and leaves."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from edgeship.fleet.broker import free_port

ROOT = Path(__file__).resolve().parents[2]
#: Names an interrupted install may leave behind; none may survive a restart.
TEMP_MARKERS = (".tmp", ".part", ".staging-", ".removing")


def listen_port() -> int:
    """A free port below the kernel's ephemeral range: the local end of an outgoing
    connection (this machine makes many) can never take it between choosing it here and
    the server (an agent, a broker node that takes seconds to start) binding it, as it can
    take one ``free_port()`` chose."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return free_port()
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(max(1024, low - 12_000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


def write_config(state_dir: Path, device: str, url: str, repo: Path, **overrides: Any
                 ) -> Path:
    (state_dir / "tuf").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(repo / "metadata" / "1.root.json", state_dir / "tuf" / "root.json")
    values = {"device_id": device, "state_dir": str(state_dir), "mqtt_url": url,
              "profile": "generic-x86_64", "api_port": listen_port(), "api_socket": "",
              "telemetry_interval_s": 60.0, "trial_window_s": 0.3, "trial_min_requests": 5,
              "health_timeout_s": 30.0, "threads": 1}
    values.update(overrides)
    lines = ["[agent]"] + [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path = state_dir / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class AgentProcess:
    """The real agent as a child process (``agent.cli.cmd_run``)."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.state_dir = config.parent
        self.port = int(next(line.split("=")[1] for line in config.read_text().splitlines()
                             if line.startswith("api_port")))
        self.proc: subprocess.Popen | None = None
        self.log = self.state_dir / "agent.log"

    def start(self, fault: str = "") -> "AgentProcess":
        """``fault``: the test's fault plan (tests/install/faults.py), handed to the
        install observer of this process only."""
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with open(self.log, "ab") as log:
            log.write(f"--- start, fault plan {fault!r}\n".encode())
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.install.agent_main", str(self.config),
                 "--fault", fault], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait_exit(self, timeout_s: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def record(self, model: str) -> dict[str, Any]:
        path = self.state_dir / "updates" / f"{model}.json"
        return json.loads(path.read_text()) if path.exists() else {}


def served(port: int, model: str, timeout_s: float = 2.0) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models/{model}",
                                    timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def predict(port: int, model: str, rows: list[list[float]], timeout_s: float = 10
            ) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models/{model}/predict",
                                 data=json.dumps({"inputs": rows}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def leftovers(state_dir: Path) -> list[str]:
    """Temp files, staging dirs and half-written records anywhere in the agent's state."""
    found = []
    for p in state_dir.rglob("*"):
        if any(m in p.name for m in TEMP_MARKERS):
            found.append(str(p.relative_to(state_dir)))
    return sorted(found)


def assert_complete_and_verified(state_dir: Path, model: str, version: int) -> None:
    """The active version on disk is whole: manifest, installed.json, the variant file with
    the manifest's size and sha256, and the golden file."""
    d = state_dir / "models" / model
    assert (d / "current").resolve() == (d / str(version)).resolve()
    manifest = json.loads((d / str(version) / "manifest.json").read_bytes())
    installed = json.loads((d / str(version) / "installed.json").read_bytes())
    (variant,) = [v for v in manifest["variants"] if v["id"] == installed["variant"]]
    data = (d / str(version) / variant["file"]).read_bytes()
    assert len(data) == variant["size"]
    assert hashlib.sha256(data).hexdigest() == variant["sha256"]
    golden = (d / str(version) / manifest["golden"]["file"]).read_bytes()
    assert hashlib.sha256(golden).hexdigest() == manifest["golden"]["sha256"]

