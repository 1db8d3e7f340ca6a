"""Rollouts with real agents over a real Mosquitto: a new version that is much slower halts
the rollout in its first wave (the reason recorded), and only the canary ever moved."""

from __future__ import annotations

import time


from edgeship.fleet.rollout import Gates, Policy, State
from edgeship.fleet.rollout_runner import load, start_rollout
from tests.fleet_control.helpers import WIDTH, Traffic
from tests.support import wait_until


def test_much_slower_release_halts_in_its_first_wave(loop_env, synth_bundles):
    from tests.support.synthetic import sample_inputs
    names = [f"pi-{i}" for i in range(4)]
    agents = [loop_env.start_agent(n) for n in names]
    loop_env.release(synth_bundles[1])  # fleet-wide announcement: everyone gets v1
    for n in names:
        loop_env.wait_serving(n, 1)
    registry = loop_env.fleet.registry
    for n in names:
        registry.set_group(n, "lab")
    traffic = Traffic(agents, "synth", sample_inputs(WIDTH))
    try:
        wait_until(lambda: len(registry.version_stats("synth", 1, 0)) == 4, what="v1 telemetry")
        time.sleep(1.5)  # a few more baseline batches
        info = loop_env.release(synth_bundles[2], announce=False)
        registry.add_release("synth", info.version, info.released_at, "test")
        policy = Policy(waves=(0.25, 1.0), soak_s=2, wave_timeout_s=90, jitter_s=0.5,
                        gates=Gates(min_requests=30, max_latency_ratio=1.5))
        rollout = start_rollout(registry, model="synth", version=2, policy=policy,
                                actor="test", group="lab")
        canary = rollout.waves[0]
        assert rollout.from_version == 1 and len(canary) == 1
        halted = wait_until(lambda: (r := load(registry, rollout.id)).state != State.RUNNING and r,
                       what="the rollout to stop")
    finally:
        traffic.stop()
    assert halted.state == State.HALTED, halted.reason
    assert "wave 1/2 failed" in halted.reason and "latency" in halted.reason
    [verdict] = halted.verdicts
    assert verdict["gate"] == "latency" and verdict["measured"]["latency_ratio"] > 1.5
    by_id = {d.id: d for d in registry.devices()}
    assert by_id[canary[0]].running("synth") == 2 and by_id[canary[0]].desired == {"synth": 2}
    others = [n for n in names if n not in canary]
    assert all(by_id[n].running("synth") == 1 and by_id[n].desired == {} for n in others)
    log = registry.audit_log(rollout.id)
    assert [e for e in log if e["action"] == "rollout.halted"][0]["devices"] == list(canary)
    # the agent persisted what it was told: a redelivered older command changes nothing
    agent = agents[names.index(canary[0])]
    assert agent.desired.version("synth") == 2


def test_rollback_command_returns_moved_devices_to_the_old_version(loop_env, synth_bundles):
    names = ["pi-a", "pi-b"]
    for n in names:
        loop_env.start_agent(n)
    loop_env.release(synth_bundles[1])
    for n in names:
        loop_env.wait_serving(n, 1)
    registry = loop_env.fleet.registry
    info = loop_env.release(synth_bundles[2], announce=False)
    registry.add_release("synth", info.version, info.released_at, "test")
    policy = Policy(waves=(1.0,), soak_s=0, jitter_s=0, wave_timeout_s=60,
                    gates=Gates(min_requests=10_000))  # never passes on traffic: stays open
    rollout = start_rollout(registry, model="synth", version=2, policy=policy, actor="test")
    for n in names:
        loop_env.wait_serving(n, 2)
    from edgeship.fleet.rollout_runner import control
    control(registry, rollout.id, "rollback", "ops", reason="customer complaint")
    done = wait_until(lambda: (r := load(registry, rollout.id)).state == State.ROLLED_BACK and r,
                 what="rollback")
    assert done.reason == "customer complaint"
    for agent in loop_env.agents:
        assert agent.store.active("synth").version == 1
        assert agent.server.get("synth").installed.version == 1
    assert all(d.running("synth") == 1 and d.desired == {"synth": 1}
               for d in registry.devices())
