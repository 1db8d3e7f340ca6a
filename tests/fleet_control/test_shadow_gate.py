"""The rollout's shadow-agreement gate, end to end: releases that ask for shadow testing
(a ``shadow`` policy in their signed manifest), real agents running each candidate beside
the served version on live requests, and the fleet gate reading exactly what the agents'
shadow runs report. A candidate that agrees advances through every wave; one whose outputs
are permuted halts the rollout in its first wave on the shadow gate; in an all-or-none
rollout the shadow run happens on hold, before the one commit."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np

from edgeship.fleet.rollout import Gates, Policy, State
from edgeship.fleet.rollout_runner import control, load, start_rollout
from tests.support import models, wait_until

POLICY = Policy(waves=(0.5, 1.0), soak_s=1, jitter_s=0, wave_timeout_s=90,
                gates=Gates(min_requests=10, max_latency_ratio=10.0))


class LiveTraffic:
    """Varied live requests to each agent's served model, in-process."""

    def __init__(self, agents) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(agents,), daemon=True)
        self._thread.start()

    def _run(self, agents) -> None:
        rng = np.random.default_rng(7)
        while not self._stop.wait(0.005):
            for agent in agents:
                try:
                    agent.server.predict("sh", rng.random((2, 4), dtype=np.float32))
                except Exception:
                    pass  # not serving yet

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _roll(registry, version, policy=POLICY):
    rollout = start_rollout(registry, model="sh", version=version, policy=policy,
                            actor="test")
    return wait_until(lambda: (r := load(registry, rollout.id)).state != State.RUNNING and r,
                      timeout_s=120, what=f"the rollout of v{version} to stop")


def _reported(loop_env, device, version):
    return [e["shadow"] for e in loop_env.watcher.events if e.get("event") ==
            "shadow_result" and e.get("device") == device and e.get("version") == version]


def test_shadow_gate_advances_an_agreeing_candidate_and_halts_a_permuted_one(
        loop_env, tmp_path):
    from edgeship.agent.manifest import ShadowPolicy
    shadow = ShadowPolicy(min_agreement=0.9, samples=30, timeout_s=60)
    b = tmp_path / "bundles"
    v1 = models.write_bundle(b / "v1", "sh", 1, models.good(1))
    v2 = models.write_bundle(b / "v2", "sh", 2, models.good(2), shadow=shadow)
    v3 = models.write_bundle(b / "v3", "sh", 3, models.reversed_classes(3), shadow=shadow,
                             golden_weights=models.weights(3)[:, ::-1])  # healthy, permuted
    v4 = models.write_bundle(b / "v4", "sh", 4, models.good(4), shadow=shadow)
    names = ["sh-0", "sh-1"]
    agents = [loop_env.start_agent(n) for n in names]
    for agent in agents:
        agent.updates.steps.settings = replace(agent.updates.steps.settings,
                                               trial_window_s=0.5)
    loop_env.release(v1)
    for n in names:
        loop_env.wait_serving(n, 1)
    registry = loop_env.fleet.registry
    for bundle in (v2, v3, v4):
        info = loop_env.release(bundle, announce=False)
        registry.add_release("sh", info.version, info.released_at, "test")
    traffic = LiveTraffic(agents)
    try:
        agreed = _roll(registry, 2)
        halted = _roll(registry, 3)
        by_id = {d.id: d for d in registry.devices()}  # before anything else moves
        control(registry, halted.id, "abort", "test")
        # all-or-none: the shadow runs on hold, before the one commit
        together = _roll(registry, 4, replace(POLICY, all_or_none=True, waves=(1.0,)))
    finally:
        traffic.stop()

    assert agreed.state == State.DONE, agreed.reason
    assert [v["decision"] for v in agreed.verdicts] == ["pass", "pass"]
    for wave, verdict in zip(agreed.waves, agreed.verdicts):
        [device] = wave
        [report] = _reported(loop_env, device, 2)  # the agent's own shadow run
        assert report["compared"] >= 30 and report["agreement"] >= 0.9
        assert verdict["measured"]["agreement"] == report["agreement"]

    assert halted.state == State.HALTED, halted.reason
    [verdict] = halted.verdicts
    assert verdict["gate"] == "shadow"
    assert "wave 1/2 failed: shadow agreement 0.0% below 90.0% on 1 of 1" in halted.reason
    [canary] = halted.waves[0]
    [report] = _reported(loop_env, canary, 3)
    assert report == {**report, "agreement": 0.0, "min_agreement": 0.9}
    assert verdict["measured"]["agreement"] == report["agreement"]
    # the canary never served v3 (reverted in shadow); the other device was never asked
    assert "serving" not in loop_env.watcher.chain(canary, 3)
    [other] = set(names) - {canary}
    assert by_id[canary].running("sh") == 2 and by_id[other].desired == {"sh": 2}
    assert _reported(loop_env, other, 3) == []

    assert together.state == State.DONE, together.reason
    for device in names:
        [report] = _reported(loop_env, device, 4)
        assert report["agreement"] >= 0.9
        chain = loop_env.watcher.chain(device, 4)
        assert chain[:2] == ["shadow_result", "held"] and "shadow" not in chain
        assert chain.index("serving") > chain.index("held")
