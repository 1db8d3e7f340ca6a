"""The whole edgeship loop on any MQTT 5 broker, for the broker tests and
``scripts/cluster-check``: fleet servers on one broker node, in-process agents on another
(the same URL twice for a single node), logging in with a user name and password file when
given, fetching over MQTT or over HTTP (a static file server of the repository).

:func:`run_loop` releases v1 to the agents online, starts one more agent after the release
(it can only learn of v1 from the fleet's catch-up, or from retained delivery where the
broker has it), checks telemetry in the registry and duplicate transfer answers, then
starts a rollout of a v2 that fails its health check and waits for the rollout to halt.
"""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgeship.agent.config import load_config
from edgeship.agent.daemon import Agent
from edgeship.fleet.membership import owner
from edgeship.fleet.registry import Registry
from edgeship.fleet.rollout import Gates, Policy, State
from edgeship.fleet.rollout_runner import load, start_rollout
from edgeship.fleet.server import FleetServer, FleetSettings
from edgeship.fleet.tuf_repo import init_repository, release_bundle
from tests.support import models, wait_until



class StaticRepo:
    """The repository directory over plain HTTP (Python's file server; no Range support,
    so an interrupted download starts over, which the HTTP fetcher handles)."""

    def __init__(self, repo: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(repo))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass


@dataclass
class LoopResult:
    transport: str
    fleet_servers: int
    transfer_modes: list[str] = field(default_factory=list)
    release_to_serving_s: float | None = None  # agents online at release time
    late_agent_serving_s: float | None = None  # started after the release
    telemetry_devices: int = 0  # devices with telemetry in the registry
    served_per_fleet: list[int] = field(default_factory=list)  # chunk answers per server
    duplicate_answers: int = 0  # transfer answers no request was waiting for
    catch_ups: int = 0
    rollout: str = ""  # final state and reason
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class BrokerLoop:
    """Keys, repository, registry, ``fleets`` fleet servers on ``fleet_url`` and agents on
    ``agent_url``, all under ``root``."""

    def __init__(self, root: Path, fleet_url: str, agent_url: str, *, transport: str = "mqtt",
                 fleets: int = 1, username: str | None = None, password: str | None = None,
                 tag: str = "t") -> None:
        """``tag`` names the model and the devices: runs on the same broker must differ
        (sessions and retained messages of an earlier run live on in the broker)."""
        self.root, self.agent_url, self.transport = root, agent_url, transport
        self.model, self.tag = f"sensor-{tag}", tag
        self.keys, self.repo = root / "keys", root / "repo"
        init_repository(self.keys, self.repo)
        self.username = username
        self.password_file = None
        if password is not None:
            self.password_file = root / "mqtt-password"
            self.password_file.write_text(password + "\n")
        self.http = StaticRepo(self.repo) if transport == "http" else None
        self.devices = [f"{tag}-b{i}" for i in (1, 2, 3)]
        self.fleets = [FleetServer(FleetSettings(
            mqtt_url=fleet_url, repo_dir=self.repo, db_path=root / "fleet.db",
            client_id=fleet_id, username=username, password=password,
            transfers="off" if transport == "http" else "auto", rollout_tick_s=0.5))
            for fleet_id in _fleet_ids(tag, fleets, self.devices)]
        self.registry = Registry(root / "fleet.db")
        self.agents: list[Agent] = []

    def start(self) -> "BrokerLoop":
        for fleet in self.fleets:
            fleet.start()
        ids = sorted(f.client_id for f in self.fleets)  # every server counts every server
        wait_until(lambda: all(f.membership.live() == ids for f in self.fleets), 30,
                   what="fleet servers settled", tick_s=0.1)
        return self

    def start_agent(self, device: str) -> Agent:
        state = self.root / "devices" / device
        (state / "tuf").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.repo / "metadata" / "1.root.json", state / "tuf" / "root.json")
        lines = [f'device_id = "{device}"', f'state_dir = "{state}"',
                 f'mqtt_url = "{self.agent_url}"', "api_enabled = false", 'api_socket = ""',
                 "telemetry_interval_s = 0.5", "trial_window_s = 0"]
        if self.username is not None:
            lines.append(f'mqtt_username = "{self.username}"')
        if self.password_file is not None:
            lines.append(f'mqtt_password_file = "{self.password_file}"')
        if self.http is not None:
            lines += ['transport = "http"', f'http_base_url = "{self.http.url}"']
        (state / "agent.toml").write_text("[agent]\n" + "\n".join(lines) + "\n")
        agent = Agent(load_config(state / "agent.toml"))
        self.registry.set_group(device, self.tag)  # the rollout's group: this run's devices
        agent.start()
        self.agents.append(agent)
        return agent

    def release(self, version: int, *, bad: bool = False, announce: bool = True):
        onnx_model = models.nan_outputs(version) if bad else models.good(version)
        bundle = models.write_bundle(self.root / "bundles" / f"v{version}", self.model,
                                     version, onnx_model)
        info = release_bundle(bundle, self.repo, self.keys)
        if announce:
            self.fleets[0].announce(info, by="broker-loop")
        else:
            self.registry.add_release(self.model, info.version, info.released_at, "broker-loop")
        return info

    def serving(self, device: str, version: int) -> bool:
        return any(e.event == "serving" and e.version == version
                   for e in self.registry.events(device=device))

    def wait_serving(self, devices: list[str], version: int, timeout_s: float) -> float:
        start = time.monotonic()
        wait_until(lambda: all(self.serving(d, version) for d in devices), timeout_s,
                   what=f"{devices} serving v{version}", tick_s=0.1)
        return time.monotonic() - start

    def close(self) -> None:
        for agent in self.agents:
            agent.stop()
        for fleet in self.fleets:
            fleet.stop()
        if self.http is not None:
            self.http.stop()
        self.registry.close()


def _fleet_ids(tag: str, n: int, devices: list[str]) -> list[str]:
    """Fleet server ids under which the devices are split between all ``n`` servers (with
    three devices some id sets give one server nothing to do, which would test nothing)."""
    for salt in range(1000):
        ids = [f"edgeship-fleet-{tag}-{salt}-{i}" for i in range(n)]
        if {owner(d, ids) for d in devices} == set(ids) or n > len(devices):
            return ids
    raise AssertionError("no split found")


def run_loop(loop: BrokerLoop, *, timeout_s: float = 90.0) -> LoopResult:
    """Release → serving (two agents online, one started after), telemetry, duplicate
    answers, then a bad release halting its rollout. Problems are collected, not raised."""
    result = LoopResult(loop.transport, len(loop.fleets))
    early, late = loop.devices[:2], loop.devices[2]
    for device in early:
        loop.start_agent(device)
    wait_until(lambda: all(a.session.wait_subscribed(0) for a in loop.agents), 30,
               what="agents subscribed")
    _step(result, "release v1", lambda: setattr(
        result, "release_to_serving_s", _timed_release(loop, early, timeout_s)))
    _step(result, "late agent", lambda: setattr(
        result, "late_agent_serving_s", _late_agent(loop, late, timeout_s)))
    devices = [a.device for a in loop.agents]
    _step(result, "telemetry", lambda: wait_until(
        lambda: all(loop.registry.latest_telemetry(d) for d in devices), 30,
        what="telemetry of every device in the registry"))
    result.telemetry_devices = sum(loop.registry.latest_telemetry(d) is not None
                                   for d in devices)
    _step(result, "rollout", lambda: setattr(result, "rollout", _bad_rollout(loop, timeout_s)))
    result.transfer_modes = [f.transfer_mode or "?" for f in loop.fleets]
    result.served_per_fleet = [f.stats.snapshot()["requests_served"] for f in loop.fleets]
    result.catch_ups = sum(f.stats.snapshot()["catch_ups"] for f in loop.fleets)
    result.duplicate_answers = sum(a.transfers.unmatched_responses for a in loop.agents)
    _judge(loop, result)
    return result


def _step(result: LoopResult, name: str, fn) -> None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - a row in the table, not a crash
        result.problems.append(f"{name}: {e}")


def _timed_release(loop: BrokerLoop, devices: list[str], timeout_s: float) -> float:
    loop.release(1)
    return loop.wait_serving(devices, 1, timeout_s)


def _late_agent(loop: BrokerLoop, device: str, timeout_s: float) -> float:
    loop.start_agent(device)
    return loop.wait_serving([device], 1, timeout_s)


def _bad_rollout(loop: BrokerLoop, timeout_s: float) -> str:
    info = loop.release(2, bad=True, announce=False)
    policy = Policy(waves=(0.25, 1.0), soak_s=0, wave_timeout_s=timeout_s, jitter_s=0,
                    gates=Gates(min_requests=1))
    rollout = start_rollout(loop.registry, model=loop.model, version=info.version,
                            policy=policy, actor="broker-loop", group=loop.tag)
    done = wait_until(lambda: (r := load(loop.registry, rollout.id)).state != State.RUNNING
                      and r, timeout_s, what="the rollout to stop", tick_s=0.2)
    return f"{done.state.value}: {done.reason}"


def _judge(loop: BrokerLoop, r: LoopResult) -> None:
    if r.telemetry_devices != len(loop.agents):
        r.problems.append(f"telemetry from {r.telemetry_devices}/{len(loop.agents)} devices")
    if r.duplicate_answers:
        r.problems.append(f"{r.duplicate_answers} transfer answers nobody waited for")
    if loop.transport == "mqtt" and set(r.transfer_modes) == {"split"}:
        ids = [f.client_id for f in loop.fleets]
        owning = {owner(a.device, ids) for a in loop.agents}
        idle = [f.client_id for f, n in zip(loop.fleets, r.served_per_fleet)
                if f.client_id in owning and n == 0]
        if idle:
            r.problems.append(f"{idle} owned devices but answered nothing")
    if loop.transport == "http" and sum(r.served_per_fleet):
        r.problems.append(f"HTTP devices fetched over MQTT: {r.served_per_fleet}")
    if r.rollout and not r.rollout.startswith(State.HALTED.value):
        r.problems.append(f"rollout did not halt: {r.rollout}")
