"""bench-quality --fleet: real agents (in-process, each with its own MQTT session, state
directory and local API) and a real fleet server over a real Mosquitto.

- time to halt: four devices serve v1 with unshifted digits; a rollout of v2 starts (waves
  25 % / 100 %); once the canary serves v2 its inputs turn into rotated digits; measured:
  seconds from that moment to the rollout's halt, which gate, whether only the canary moved;
- false halts: N rollouts in a row (v3, v4, ...; the same weights) with unshifted traffic
  only, each to the end; a halt is a false halt. The latency gate is off in both (a 50 us
  model's p50 moves 1.5x on this shared machine); every quality gate is on, with defaults.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tests.support import shifts, wait_until

DEVICES = 4
SHIFT = ("rotation", 25)


def _env(tmp: Path):
    from edgeship.fleet.broker import Mosquitto
    from tests.support.loop_env import LoopEnv

    broker = Mosquitto().start()
    return broker, LoopEnv(broker.url, tmp)


def fleet_rows(setup: Any, runs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-quality-fleet-") as tmp:
        root = Path(tmp)
        broker, env = _env(root)
        try:
            return _scenarios(setup, env, root, runs)
        finally:
            env.close()
            broker.cleanup()


def _scenarios(setup: Any, env: Any, root: Path, runs: int) -> dict[str, Any]:
    names = [f"pi-{i}" for i in range(DEVICES)]
    agents = [env.start_agent(n) for n in names]
    env.release(setup.bundle)
    for n in names:
        env.wait_serving(n, 1)
    registry = env.fleet.registry
    for n in names:
        registry.set_group(n, "lab")
    rng = np.random.default_rng(0)
    pool, shifted = setup.x_live, shifts.COVARIATE[SHIFT[0]](setup.x_live, SHIFT[1])
    mode = {"shifted": set()}

    def source(i: int):
        k = int(rng.integers(0, len(pool)))
        x = shifted if names[i] in mode["shifted"] else pool
        return x[k:k + 1], None

    traffic = shifts.Traffic(agents, "digits", source)
    try:
        halt = _time_to_halt(setup, env, registry, root, mode)
        mode["shifted"].clear()
        false = _false_halts(setup, env, registry, root, runs, first_version=3)
    finally:
        traffic.stop()
    return {"halt": halt, "false_halts": false, "devices": DEVICES,
            "shift": f"{SHIFT[0]} {SHIFT[1]}"}


def _rollout(env: Any, registry: Any, bundle: Path, version: int, soak_s: float):
    """Default gates, except latency: a 50 us model's p50 moves 1.5x on this shared
    2-core machine, which would halt runs for reasons that are not quality."""
    from edgeship.fleet.rollout import Gates, Policy
    from edgeship.fleet.rollout_runner import start_rollout

    info = env.release(bundle, announce=False)
    registry.add_release("digits", info.version, info.released_at, "bench")
    policy = Policy(waves=(0.25, 1.0), soak_s=soak_s, jitter_s=0.2, wave_timeout_s=300,
                    gates=Gates(max_latency_ratio=100.0))
    return start_rollout(registry, model="digits", version=version, policy=policy,
                         actor="bench", group="lab")


def _time_to_halt(setup: Any, env: Any, registry: Any, root: Path, mode: dict
                  ) -> dict[str, Any]:
    from edgeship.fleet.rollout import State
    from edgeship.fleet.rollout_runner import load

    bundle = shifts.renumber_bundle(setup.bundle, root / "v2", 2)
    rollout = _rollout(env, registry, bundle, 2, soak_s=120)
    canary = rollout.waves[0][0]
    env.wait_serving(canary, 2, timeout_s=120)
    time.sleep(2.0)  # the canary serves v2 on unshifted inputs for a moment
    start = time.monotonic()
    mode["shifted"].add(canary)
    stopped = wait_until(lambda: (r := load(registry, rollout.id)).state != State.RUNNING
                         and r, 120, "halt", tick_s=0.1)
    seconds = time.monotonic() - start
    verdict = stopped.verdicts[-1] if stopped.verdicts else {}
    moved = [d for d in stopped.sent]
    return {"seconds": seconds, "state": stopped.state.value, "gate": verdict.get("gate"),
            "reason": stopped.reason, "moved": moved, "canary": canary,
            "js": (verdict.get("measured") or {}).get("drift_js")}


def _false_halts(setup: Any, env: Any, registry: Any, root: Path, runs: int,
                 first_version: int) -> dict[str, Any]:
    from edgeship.fleet.rollout import State
    from edgeship.fleet.rollout_runner import control, load

    for r in registry.rollouts([State.HALTED.value, State.RUNNING.value]):
        control(registry, r["id"], "abort", "bench")
    halts, worst, durations = [], [], []
    for k in range(runs):
        version = first_version + k
        bundle = shifts.renumber_bundle(setup.bundle, root / f"v{version}", version)
        t0 = time.monotonic()
        rollout = _rollout(env, registry, bundle, version, soak_s=5)
        done = wait_until(lambda: (r := load(registry, rollout.id)).state in
                          (State.DONE, State.HALTED, State.ROLLED_BACK) and r, 300,
                          "the end", tick_s=0.1)
        durations.append(time.monotonic() - t0)
        js = [(v.get("measured") or {}).get("drift_js") for v in done.verdicts]
        worst.append(max((x for x in js if x is not None), default=None))
        if done.state != State.DONE:
            halts.append({"version": version, "reason": done.reason})
            control(registry, rollout.id, "abort", "bench")
    return {"runs": runs, "halts": halts, "worst_js": worst,
            "seconds_per_run": float(np.mean(durations)) if durations else None}


def print_fleet(doc: dict[str, Any]) -> None:
    h, f = doc["halt"], doc["false_halts"]
    print(f"\n5. fleet: {doc['devices']} real agents, one fleet server, Mosquitto; telemetry "
          "every 0.5 s, runner tick 1 s")
    print(f"   shift ({doc['shift']} degrees on the canary) -> rollout {h['state']} after "
          f"{h['seconds']:.1f} s; gate {h['gate']}, JS {h['js']}; moved {h['moved']} "
          f"(canary {h['canary']})")
    print(f"   false halts in {f['runs']} unshifted rollouts: {len(f['halts'])} "
          f"({f['seconds_per_run']:.0f} s per rollout; largest wave JS per run "
          f"{[round(x, 3) if x is not None else None for x in f['worst_js']]})")
    for halt in f["halts"]:
        print(f"     v{halt['version']}: {halt['reason']}")
