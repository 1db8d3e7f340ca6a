"""A bench worker process: ``count`` real :class:`agent.daemon.Agent` instances (each with
its own MQTT connection, TUF client and state directory) in one process, plus optional
inference traffic on them. Driven by lines on stdin: ``traffic RATE`` (requests per second
per device), ``stop``. Prints ``READY n`` once every agent has started."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from edgeship.agent.config import AgentConfig
from edgeship.agent.daemon import Agent
from edgeship.agent.errors import EdgeshipError
from edgeship.common.mqtt_loop import SharedLoop
from tests.support.synthetic import sample_inputs


def make_agent(root: Path, device: str, url: str, repo: Path, telemetry_s: float,
               mqtt_loop: SharedLoop | None = None) -> Agent:
    state = root / device
    (state / "tuf").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(repo / "metadata" / "1.root.json", state / "tuf" / "root.json")
    fields = {f.name for f in dataclasses.fields(AgentConfig)}
    extra = {k: v for k, v in (("api_socket", ""), ("trial_window_s", 0.0),
                                         ("api_enabled", False)) if k in fields}
    cfg = AgentConfig(device_id=device, state_dir=state, mqtt_url=url, api_port=0,
                      telemetry_interval_s=telemetry_s, threads=1, **extra)
    agent = Agent(cfg, mqtt_loop=mqtt_loop)
    # the forwarder is woken by every new record and every reconnect; its 1 s idle poll is
    # free on a board but, x250 agents per process, a queue of threads waiting for one GIL
    agent.telemetry.forwarder.idle_wait_s = max(1.0, telemetry_s)
    steps = agent.updates.steps
    # one Python child per install x 1,000 simulated devices on 2 cores would measure
    # process start-up, not the fleet: the same check runs in-process instead
    steps.settings = dataclasses.replace(steps.settings, health_in_subprocess=False)
    # the profile's per-inference latency budget is a property of one board; 1,000 simulated
    # boards sharing 2 cores would miss it for reasons that are not the model's
    agent.traits = steps.traits = agent.updates.downloader.traits = dataclasses.replace(
        agent.traits, latency_budget_ms=None)
    return agent


def gate_installs(agent: Agent, slots: threading.Semaphore) -> None:
    """Run this agent's installs on one of the process's ``slots`` (a shared pool of N
    update workers): hundreds of update threads that all want one GIL at once spend their
    time handing it over (futex storms, starved MQTT keepalives), not installing."""
    do = agent.worker.do

    def gated(*args, **kwargs):
        with slots:
            return do(*args, **kwargs)
    agent.worker.do = gated


class Traffic:
    def __init__(self, agents: list[Agent], model: str, width: int, rate_per_s: float) -> None:
        self.agents, self.model, self.rate = agents, model, rate_per_s
        self.x = sample_inputs(width)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        period = 1.0 / self.rate
        while not self._stop.is_set():
            start = time.monotonic()
            for agent in self.agents:
                try:
                    agent.server.predict(self.model, self.x)
                except EdgeshipError:
                    pass
            self._stop.wait(max(0.0, period - (time.monotonic() - start)))

    def stop(self) -> None:
        self._stop.set()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--repo", type=Path, required=True)
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--first", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--telemetry-s", type=float, default=5.0)
    p.add_argument("--model", default="synth")
    p.add_argument("--width", type=int, default=724)
    p.add_argument("--install-slots", type=int, default=16,
                   help="installs running at once in this process (0: no limit)")
    p.add_argument("--loops", type=int, default=1,
                   help="shared MQTT network threads in this process (0: one per agent)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    loops = [SharedLoop(name=f"edgeship-mqtt-shared-{n}") for n in range(args.loops)]
    slots = threading.BoundedSemaphore(args.install_slots) if args.install_slots else None
    agents = []
    for i in range(args.first, args.first + args.count):
        loop = loops[i % len(loops)] if loops else None
        agent = make_agent(args.root, f"sim-{i:05d}", args.url, args.repo, args.telemetry_s,
                           loop)
        if slots is not None:
            gate_installs(agent, slots)
        agent.start()
        agents.append(agent)
    print(f"READY {len(agents)}", flush=True)
    traffic = None
    for line in sys.stdin:
        cmd = line.split()
        if cmd[:1] == ["traffic"]:
            traffic = Traffic(agents, args.model, args.width, float(cmd[1]))
        elif cmd[:1] == ["stop"]:
            break
    if traffic:
        traffic.stop()
    with ThreadPoolExecutor(32) as pool:  # each stop waits for its final PUBACK
        list(pool.map(Agent.stop, agents))
    for loop in loops:
        loop.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
