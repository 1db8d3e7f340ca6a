"""All-or-none rollouts as a real simultaneous switch, with real agents over a real
Mosquitto: every device stages and health-checks the new version without switching
(``held``), the fleet sends one commit when all have, and each switches on it. One device
that cannot stage means none switches; a device offline at the commit switches when it
returns."""

from __future__ import annotations

import time
from dataclasses import replace

from edgeship.agent.daemon import Agent
from edgeship.agent.protocol import DesiredState, Topics
from edgeship.fleet.rollout import Gates, Policy, State
from edgeship.fleet.rollout_runner import load, start_rollout
from tests.fleet_control.helpers import WIDTH, Traffic
from tests.support import wait_until


def _fleet_on_v1(loop_env, synth_bundles, names):
    agents = [loop_env.start_agent(n) for n in names]
    loop_env.release(synth_bundles[1])
    for n in names:
        loop_env.wait_serving(n, 1)
    registry = loop_env.fleet.registry
    for n in names:
        registry.set_group(n, "line-3")
    info = loop_env.release(synth_bundles[3], announce=False)
    registry.add_release("synth", info.version, info.released_at, "test")
    return agents, registry


def _events(loop_env, event, version=3):
    return [e for e in loop_env.watcher.events
            if e.get("event") == event and e.get("version") == version]


POLICY = Policy(all_or_none=True, waves=(1.0,), soak_s=1, jitter_s=0.5, wave_timeout_s=60,
                gates=Gates(min_requests=10, max_latency_ratio=5.0))


def test_one_device_that_cannot_stage_means_none_switches(loop_env, synth_bundles):
    names = ["cell-a", "cell-b", "cell-c"]
    agents, registry = _fleet_on_v1(loop_env, synth_bundles, names)
    # cell-b cannot meet its latency budget: its health check of the new version fails
    steps = agents[1].updates.steps
    steps.traits = replace(steps.traits, latency_budget_ms=1e-6)
    rollout = start_rollout(registry, model="synth", version=3, policy=POLICY, actor="test",
                            group="line-3")
    done = wait_until(lambda: (r := load(registry, rollout.id)).state in
                      (State.ROLLED_BACK, State.DONE) and r, what="the rollout to end")
    assert done.state == State.ROLLED_BACK, done.reason
    assert "none switches" in done.reason and "cell-b: latency_budget_exceeded" in done.reason
    [failed] = _events(loop_env, "failed")
    assert failed["device"] == "cell-b" and failed["hold"] is True
    # whoever had staged it discards it; nobody ever served the new version
    held = {e["device"] for e in _events(loop_env, "held")}
    assert "cell-b" not in held
    for device in held:
        loop_env.watcher.wait_for(lambda e: e.get("device") == device and
                                  e.get("event") == "discarded" and e.get("version") == 3)
    assert _events(loop_env, "serving") == []
    for agent in agents:
        assert agent.server.get("synth").installed.version == 1
        assert agent.store.active_version("synth") == 1
        wait_until(lambda: 3 not in agent.store.versions("synth"), timeout_s=30,
                   what="the held copy to be removed")
    assert all(d.running("synth") == 1 and d.desired == {"synth": 1}
               for d in registry.devices())
    actions = [e["action"] for e in registry.audit_log(rollout.id)]
    assert "rollout.commit" not in actions and "rollout.rolled_back" in actions


def test_all_stage_then_one_commit_switches_all_and_an_offline_one_on_return(
        loop_env, synth_bundles):
    from tests.support.synthetic import sample_inputs
    names = ["cell-a", "cell-b", "cell-c", "cell-d"]
    agents, registry = _fleet_on_v1(loop_env, synth_bundles, names)
    runner = loop_env.fleet.rollouts
    runner.stop()  # the test ticks the runner itself
    # one download at a time, no jitter: devices stage one after another, in wave order
    policy = replace(POLICY, max_concurrent=1, jitter_s=0)
    rollout = start_rollout(registry, model="synth", version=3, policy=policy, actor="test",
                            group="line-3")
    order = list(rollout.waves[0])

    def held(device):
        runner.tick()
        return device in registry.install_outcomes("synth", 3, 0, ("held",))
    wait_until(lambda: held(order[0]), what="the first device to stage")
    offline = agents[names.index(order[0])]  # it goes offline before the commit
    offline.stop()
    loop_env.agents.remove(offline)
    wait_until(lambda: runner.tick() or load(registry, rollout.id).committed_at,
               what="the commit")
    online = order[1:]
    switched = [loop_env.wait_serving(n, 3) for n in online]
    assert {e["device"] for e in _events(loop_env, "held")} == set(names)
    last_held = max(e["ts"] for e in _events(loop_env, "held"))
    times = sorted(e["ts"] for e in switched)
    assert times[0] > last_held  # no device switched before every device had staged
    assert times[-1] - times[0] < 5.0, times  # one commit: they switch together
    # the device that was offline switches when it returns (retained, persisted desired)
    returned = Agent(offline.cfg)
    returned.start()
    loop_env.agents.append(returned)
    loop_env.wait_serving(order[0], 3)
    assert returned.server.get("synth").installed.version == 3
    traffic = Traffic([a for a in loop_env.agents], "synth", sample_inputs(WIDTH))
    try:
        done = wait_until(lambda: runner.tick() or (r := load(registry, rollout.id)).state
                          != State.RUNNING and r, what="the rollout to finish", timeout_s=60)
    finally:
        traffic.stop()
    assert done.state == State.DONE, done.reason
    assert all(d.running("synth") == 3 for d in registry.devices())
    [commit] = [e for e in registry.audit_log(rollout.id) if e["action"] == "rollout.commit"]
    assert sorted(commit["devices"]) == names
    # redelivered commands change nothing: the old hold (older seq) and the commit again
    device = online[0]
    [now] = registry.desired(device, "synth")
    held_before = len(_events(loop_env, "held"))
    for ds in (DesiredState("synth", 3, now.seq - 1, rollout.id, hold=True),
               DesiredState("synth", 3, now.seq, rollout.id)):
        loop_env.publish(Topics.desired(device), ds.to_bytes())
    loop_env.publish(Topics.desired(device), DesiredState("synth", 3, now.seq).to_bytes(),
                     retain=True)  # and the retained one, as a reconnect would see it
    time.sleep(1.0)
    assert len(_events(loop_env, "held")) == held_before
    agent = next(a for a in loop_env.agents if a.device == device)
    assert not agent.desired.holds("synth") and agent.server.get("synth").installed \
        .version == 3
