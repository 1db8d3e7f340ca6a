"""All-or-none switch timing: real in-process agents, a real Mosquitto, one fleet server.

For each group size: start the agents on v1, run an ``--all-or-none`` rollout to v2 and
measure from the agents' own status events: rollout start → every device ``held``
(download, verify, health check, warm-up), the commit → each device ``serving`` v2, and
the spread between the first and the last switch. Run by ``scripts/bench-all-or-none``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from edgeship.agent.config import load_config
from edgeship.agent.daemon import Agent
from edgeship.demo import write_agent_config
from tests.support.synthetic import write_synthetic_bundle
from edgeship.fleet.broker import Mosquitto, free_port
from edgeship.fleet.rollout import Gates, Policy, State
from edgeship.fleet.rollout_runner import load, start_rollout
from edgeship.fleet.server import FleetServer, FleetSettings
from edgeship.fleet.tuf_repo import init_repository, release_bundle


def _wait(pred, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


def _events(registry, event: str, version: int) -> dict[str, float]:
    """device -> ts the agent stamped on its first ``event`` for ``version``."""
    out: dict[str, float] = {}
    for e in registry.events(limit=100_000):
        if e.event == event and e.version == version and e.device not in out:
            out[e.device] = float(e.raw.get("ts", e.ts))
    return out


def run_group(root: Path, n: int, width: int) -> dict:
    broker = Mosquitto().start()
    keys, repo = root / "keys", root / "repo"
    init_repository(keys, repo)
    fleet = FleetServer(FleetSettings(mqtt_url=broker.url, repo_dir=repo,
                                      db_path=root / "fleet.db", rollout_tick_s=0.2))
    fleet.start()
    agents = []
    try:
        v1 = release_bundle(write_synthetic_bundle(root / "b1", version=1, width=width),
                            repo, keys)
        fleet.announce(v1)
        for i in range(n):
            cfg = write_agent_config(root / "devices" / f"aon-{i}", f"aon-{i}", broker.url,
                                     "generic-x86_64", free_port(), 1.0, repo)
            agent = Agent(load_config(cfg))
            agent.start()
            agents.append(agent)
        reg = fleet.registry
        _wait(lambda: len(_events(reg, "serving", 1)) == n, 120, "v1 everywhere")
        v2 = release_bundle(write_synthetic_bundle(root / "b2", version=2, width=width,
                                                   seed=3), repo, keys)
        reg.add_release("synth", 2, v2.released_at, "bench")
        policy = Policy(all_or_none=True, waves=(1.0,), jitter_s=0, soak_s=0,
                        wave_timeout_s=300, max_concurrent=n,
                        gates=Gates(min_install_success=1.0, min_requests=0))
        t0 = time.time()
        rollout = start_rollout(reg, model="synth", version=2, policy=policy, actor="bench")
        _wait(lambda: len(_events(reg, "serving", 2)) == n or
              load(reg, rollout.id).state not in (State.RUNNING,), 300, "the switch")
        held, serving = _events(reg, "held", 2), _events(reg, "serving", 2)
        [commit] = [e["ts"] for e in reg.audit_log(rollout.id)
                    if e["action"] == "rollout.commit"]
        after = sorted(t - commit for t in serving.values())
        return {"devices": n, "held_s": max(held.values()) - t0, "failed": n - len(serving),
                "first_s": after[0], "median_s": statistics.median(after),
                "last_s": after[-1], "spread_s": after[-1] - after[0],
                "before_commit": sum(1 for t in serving.values() if t < max(held.values()))}
    finally:
        for agent in agents:
            agent.stop()
        fleet.stop()
        broker.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench-all-or-none", description=__doc__)
    p.add_argument("--sizes", default="3,10", help="group sizes (default 3,10)")
    p.add_argument("--width", type=int, default=256, help="synthetic model width")
    args = p.parse_args(argv)
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory(prefix="edgeship-aon-") as tmp:
            rows.append(run_group(Path(tmp), n, args.width))
    load1 = os.getloadavg()[0]
    print(f"all-or-none switch, in-process agents, load {load1:.1f} on {os.cpu_count()} "
          "cores (times from the agents' status events)")
    print(f"{'devices':>7} {'start→all held s':>17} {'commit→first s':>15} "
          f"{'commit→median s':>16} {'commit→last s':>14} {'spread s':>9} "
          f"{'switched early':>15} {'failed':>7}")
    for r in rows:
        print(f"{r['devices']:>7} {r['held_s']:>17.2f} {r['first_s']:>15.3f} "
              f"{r['median_s']:>16.3f} {r['last_s']:>14.3f} {r['spread_s']:>9.3f} "
              f"{r['before_commit']:>15} {r['failed']:>7}")
    return 0 if all(r["failed"] == 0 and r["before_commit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
