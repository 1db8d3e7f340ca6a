"""Rollout policy without a broker: waves, gates, the state machine, and the runner's
decisions driven through a real SQLite registry with a recording publish function."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from edgeship.agent.errors import ConfigError
from edgeship.fleet.registry import Registry
from edgeship.fleet.rollout import (DeviceStats, Gates, Policy, State, TransitionError,
                           WaveObservation, evaluate_wave, jitter_offset_s, parse_waves,
                           plan_waves, transition, Event)
from edgeship.fleet.rollout_runner import RolloutRunner, control, load, start_rollout

FAST = Policy(waves=(0.1, 0.5, 1.0), soak_s=0, wave_timeout_s=100, jitter_s=0,
              gates=Gates(min_requests=10))


def test_waves_are_cumulative_stable_and_never_empty():
    devices = [f"d{i:03d}" for i in range(200)]
    waves = plan_waves(devices, (0.01, 0.10, 0.50, 1.0), seed="r1")
    assert [len(w) for w in waves] == [2, 18, 80, 100]
    assert sorted(sum(waves, [])) == devices
    assert plan_waves(devices, (0.01, 0.10, 0.50, 1.0), seed="r1") == waves
    assert plan_waves(devices, (0.01, 1.0), seed="r2")[0] != waves[0]
    assert [len(w) for w in plan_waves(["a", "b"], (0.01, 0.1, 0.5, 1.0), "s")] == [1, 1]
    assert parse_waves("1,10,50,100") == (0.01, 0.1, 0.5, 1.0)
    with pytest.raises(ConfigError):
        Policy(waves=(0.5, 0.1, 1.0))
    with pytest.raises(ConfigError):
        Policy(waves=(0.5,))
    offsets = {jitter_offset_s("r", f"d{i}", 10.0) for i in range(50)}
    assert all(0 <= o < 10 for o in offsets) and len(offsets) == 50


def test_state_machine_rejects_commands_that_do_not_apply():
    assert transition(State.RUNNING, Event.PAUSE) == State.PAUSED
    assert transition(State.HALTED, Event.RESUME) == State.RUNNING
    assert transition(State.DONE, Event.ROLLBACK) == State.ROLLING_BACK
    with pytest.raises(TransitionError):
        transition(State.DONE, Event.RESUME)
    with pytest.raises(TransitionError):
        transition(State.ROLLED_BACK, Event.PAUSE)


def _obs(outcomes, new=None, base=None, started=0.0, installed=0.0, devices=("a", "b")):
    return WaveObservation(devices=devices, started_at=started, outcomes=outcomes,
                           new_stats=new or {}, baseline=base or {}, installed_at=installed)


OK = {"a": ("serving", None), "b": ("serving", None)}


@pytest.mark.parametrize("obs,decision,gate", [
    (_obs({"a": ("serving", None)}), "wait", None),
    (_obs({"a": ("failed", "hash_mismatch")}), "fail", "install_success"),
    (_obs(OK, {"a": DeviceStats(4, 0, 1.0)}), "wait", None),  # not enough traffic yet
    (_obs(OK, {"a": DeviceStats(50, 5, 1.0)}), "fail", "error_rate"),
    (_obs(OK, {"a": DeviceStats(50, 0, 3.0), "b": DeviceStats(50, 0, 3.3)},
          {"a": DeviceStats(50, 0, 1.0), "b": DeviceStats(50, 0, 1.1)}), "fail", "latency"),
    (_obs(OK, {"a": DeviceStats(50, 0, 1.2), "b": DeviceStats(50, 0, 1.0)},
          {"a": DeviceStats(50, 0, 1.0), "b": DeviceStats(50, 0, 1.0)}), "pass", None),
    (_obs(OK, {"a": DeviceStats(50, 0, 3.0)}), "pass", None),  # no baseline: no regression
])
def test_gates(obs, decision, gate):
    verdict = evaluate_wave(obs, FAST, now=10.0)
    assert (verdict.decision, verdict.gate) == (decision, gate), verdict.reason


def test_latency_verdict_names_the_ratio_and_timeouts_fail():
    obs = _obs(OK, {"a": DeviceStats(50, 0, 3.0), "b": DeviceStats(50, 0, 3.0)},
               {"a": DeviceStats(50, 0, 1.0), "b": DeviceStats(50, 0, 1.0)})
    verdict = evaluate_wave(obs, FAST, now=10.0)
    assert "3.00x the previous version on the same 2 device(s)" in verdict.reason
    late = evaluate_wave(_obs({"a": ("serving", None)}), FAST, now=1000.0)
    assert late.decision == "fail" and "did not install" in late.reason



def test_shadow_gate_reads_the_agents_shadow_result_and_fails_before_the_install_gate():
    from edgeship.agent.manifest import ShadowPolicy
    from edgeship.agent.shadow import ShadowRun
    from edgeship.fleet.rollout import ShadowResult
    run = ShadowRun(None, ShadowPolicy(min_agreement=0.9, samples=40))  # no samples offered
    run.compared, run.agreed = 40, 2
    run.close()
    report = ShadowResult.from_report(run.summary())
    assert report == ShadowResult(0.05, 40, 40, 0.9)
    # the device reverted it (shadow_disagreement): the verdict names the shadow gate
    obs = WaveObservation(devices=("a", "b"), started_at=0.0, outcomes={
        "a": ("failed", "shadow_disagreement")}, new_stats={}, baseline={},
        shadow={"a": report})
    verdict = evaluate_wave(obs, FAST, now=10.0)  # no rollout threshold: the release's
    assert (verdict.decision, verdict.gate) == ("fail", "shadow")
    assert "shadow agreement 5.0% below 90.0% on 1 of 2 device(s) (40 samples" \
        in verdict.reason
    strict = Policy(soak_s=0, gates=Gates(min_requests=1, min_shadow_agreement=0.99))
    good = ShadowResult(0.95, 40, 40, 0.9)
    agreed = _obs(OK, {"a": DeviceStats(50, 0, 1.0)})
    assert evaluate_wave(replace(agreed, shadow={"a": good}), FAST, 10.0).decision == "pass"
    assert evaluate_wave(replace(agreed, shadow={"a": good}), strict, 10.0).gate == "shadow"
    short = ShadowResult(1.0, 10, 40, 0.9)  # timed out before enough samples
    assert evaluate_wave(replace(agreed, shadow={"a": short}), FAST, 10.0).gate == "shadow"
    waiting = evaluate_wave(agreed, strict, 10.0)  # demanded, none reported yet
    assert waiting.decision == "wait" and "shadow" in waiting.reason


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def fleet(registry_target):
    """A registry (SQLite and PostgreSQL) with ten devices running m v1, m v2 released."""
    clock = Clock()
    reg = Registry(registry_target, clock=clock)
    for i in range(10):
        reg.upsert_presence(f"d{i}", {"online": True, "models": {"m": {"version": 1}}})
        reg.set_group(f"d{i}", "north")
    reg.add_release("m", 2, 0, "test")
    sent = []
    stops = []
    runner = RolloutRunner(reg, lambda dev, ds: sent.append((dev, ds)),
                           lambda m, v, stopped=True: stops.append((m, v, stopped)),
                           clock=clock)
    yield reg, runner, sent, stops, clock
    reg.close()


def _serve(reg, devices, version, p50, requests=20):
    for d in devices:
        reg.add_event(d, {"event": "serving", "model": "m", "version": version})
        reg.add_telemetry(d, {"models": {"m": {"version": version, "requests": requests,
                                               "errors": 0, "latency_ms": {"p50": p50}}}})


def test_runner_advances_passing_waves_to_done(fleet, caplog):
    caplog.set_level(logging.INFO, logger="edgeship.fleet")
    reg, runner, sent, stops, clock = fleet
    _serve(reg, [f"d{i}" for i in range(10)], 1, 1.0)
    r = start_rollout(reg, model="m", version=2, policy=FAST, actor="alice", group="north")
    assert r.from_version == 1 and [len(w) for w in r.waves] == [1, 4, 5]
    for wave in r.waves:
        runner.tick()
        assert {d for d, _ in sent[-len(wave):]} == set(wave)
        clock.t += 1
        _serve(reg, wave, 2, 1.1)
        runner.tick()
    r = load(reg, r.id)
    assert r.state == State.DONE and len(r.verdicts) == 3
    seqs = [ds.seq for _, ds in sent]
    assert seqs == sorted(seqs) and len(set(seqs)) == 10
    actions = [e["action"] for e in reg.audit_log(r.id)]
    assert actions[0] == "rollout.start" and actions.count("rollout.wave_passed") == 3
    progress = [m for m in caplog.messages if m.startswith(f"rollout {r.id}:")]
    assert any("wave 1/3 started (1 devices)" in m for m in progress), progress
    assert any("wave 3/3 passed" in m for m in progress), progress


def test_slow_first_wave_halts_or_rolls_back_per_policy(fleet):
    reg, runner, sent, stops, clock = fleet
    _serve(reg, [f"d{i}" for i in range(10)], 1, 1.0)
    policy = Policy.from_dict({**FAST.to_dict(), "on_failure": "rollback"})
    r = start_rollout(reg, model="m", version=2, policy=policy, actor="alice")
    runner.tick()
    canary = list(r.waves[0])
    _serve(reg, canary, 2, 3.0)
    runner.tick()
    r = load(reg, r.id)
    assert r.state == State.ROLLING_BACK and "latency" in r.reason and "3.00x" in r.reason
    runner.tick()  # publishes desired v1 to the canary and stops transfers of v2
    assert sent[-1][0] == canary[0] and sent[-1][1].version == 1
    assert ("m", 2, True) in stops
    _serve(reg, canary, 1, 1.0)
    reg.upsert_presence(canary[0], {"online": True, "models": {"m": {"version": 1}}})
    runner.tick()
    assert load(reg, r.id).state == State.ROLLED_BACK
    assert len(sent) == 2  # no other wave was ever told to move
    halted = [e for e in reg.audit_log(r.id) if e["action"] == "rollout.halted"]
    assert halted and halted[0]["devices"] == canary and halted[0]["gate"] == "latency"


def test_pause_resume_abort_commands(fleet):
    reg, runner, sent, stops, clock = fleet
    r = start_rollout(reg, model="m", version=2, policy=FAST, actor="alice")
    control(reg, r.id, "pause", "bob")
    runner.tick()
    assert sent == []  # paused before the first wave: nobody moves
    with pytest.raises(TransitionError):
        control(reg, r.id, "pause", "bob")
    control(reg, r.id, "resume", "bob")
    runner.tick()
    assert len(sent) == 1
    control(reg, r.id, "abort", "carol", reason="wrong model")
    runner.tick()
    r = load(reg, r.id)
    assert r.state == State.ABORTED and r.reason == "wrong model"
    assert stops[-1] == ("m", 2, True)
    assert sent[-1][1].version == 1  # the unfinished device wants the old version again
    log = reg.audit_log(r.id)
    assert [(e["actor"], e["action"]) for e in log if e["actor"] != "fleet"] == [
        ("alice", "rollout.start"), ("bob", "rollout.pause"), ("bob", "rollout.resume"),
        ("carol", "rollout.abort")]
    with pytest.raises(ConfigError):
        start_rollout(reg, model="m", version=9, policy=FAST, actor="x")


def test_all_or_none_commits_only_when_every_device_held_and_fails_on_any_failure():
    from edgeship.fleet.rollout import staging_verdict
    devs = ("a", "b", "c")
    held = {"a": ("held", None), "b": ("held", None)}
    assert staging_verdict(devs, held, 0, 5, 60).decision == "wait"
    assert staging_verdict(devs, {**held, "c": ("held", None)}, 0, 5, 60).decision == "pass"
    v = staging_verdict(devs, {**held, "c": ("failed", "golden_mismatch")}, 0, 5, 60)
    assert (v.decision, v.gate) == ("fail", "all_or_none")
    assert "c: golden_mismatch" in v.reason and "none switches" in v.reason
    v = staging_verdict(devs, held, 0, 61, 60)  # c never staged: deadline
    assert v.decision == "fail" and "did not stage within 60s (c)" in v.reason


def test_hold_commit_and_discard_on_the_wire_and_across_restarts(tmp_path):
    from edgeship.agent.update.desired import DesiredTracker
    from edgeship.agent.protocol import DesiredState
    hold = DesiredState("m", 3, 7, "r-1", hold=True)
    assert DesiredState.from_bytes(hold.to_bytes()) == hold
    assert b"hold" not in DesiredState("m", 3, 8).to_bytes()  # old agents read it as before
    t = DesiredTracker(tmp_path)
    assert t.accept(hold) and t.holds("m")
    assert DesiredTracker(tmp_path).holds("m")  # a restarted agent still waits
    assert not t.accept(hold)  # redelivered hold: nothing happens
    assert t.accept(DesiredState("m", 3, 8, "r-1")) and not t.holds("m")  # the commit
    assert not t.accept(hold)  # a late hold never undoes the commit
    assert not DesiredTracker(tmp_path).holds("m") and t.version("m") == 3


def test_registry_records_hold_and_commit_as_separate_changes(tmp_path):
    reg = Registry(tmp_path / "f.db")
    first, changed = reg.set_desired("d", "m", 3, rollout="r", hold=True)
    assert changed and first.hold
    assert reg.set_desired("d", "m", 3, rollout="r", hold=True) == (first, False)
    commit, changed = reg.set_desired("d", "m", 3, rollout="r")
    assert changed and not commit.hold and commit.seq > first.seq
    assert reg.desired("d")[0].hold is False
    reg.close()


def test_a_wave_that_needs_no_traffic_passes_without_any():
    no_traffic = Policy(soak_s=0, gates=Gates(min_requests=0))
    assert evaluate_wave(_obs(OK), no_traffic, now=10.0).decision == "pass"


def test_all_or_none_deadline_or_abort_while_staging_discards_everywhere(fleet):
    reg, runner, sent, stops, clock = fleet
    _serve(reg, [f"d{i}" for i in range(10)], 1, 1.0)
    policy = Policy(all_or_none=True, waves=(1.0,), jitter_s=0, soak_s=0, wave_timeout_s=60,
                    max_concurrent=4)
    r = start_rollout(reg, model="m", version=2, policy=policy, actor="alice", group="north")
    runner.tick()
    first = [d for d, _ in sent]
    assert len(first) == 4 and all(ds.hold and ds.version == 2 for _, ds in sent)
    for d in first:  # held ones free download slots; the cap holds for staging too
        reg.add_event(d, {"event": "held", "model": "m", "version": 2})
    clock.t += 1
    runner.tick()
    assert len(sent) == 8 and all(ds.hold for _, ds in sent)
    clock.t += 61  # 8 held, 2 never staged: the deadline passes, nobody was committed
    runner.tick()
    r = load(reg, r.id)
    assert r.state == State.ROLLING_BACK and "did not stage within 60s" in r.reason
    runner.tick()
    discards = sent[8:]
    assert {d for d, _ in discards} == {d for d, _ in sent[:8]}  # everyone told, nobody else
    assert all(ds.version == 1 and not ds.hold for _, ds in discards)
    assert ("m", 2, True) in stops  # and transfers still running are stopped
    assert not [e for e in reg.audit_log(r.id) if e["action"] == "rollout.commit"]
    r2 = start_rollout(reg, model="m", version=2, policy=policy, actor="alice", group="north")
    runner.tick()
    control(reg, r2.id, "abort", "carol", reason="line stopped")
    runner.tick()
    told = [ds for _, ds in sent if ds.rollout == r2.id]
    assert [ds.hold for ds in told] == [True] * 4 + [False] * 4
    assert all(ds.version == 1 for ds in told[4:])
