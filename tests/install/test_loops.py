"""Loop breakers, with the real agent process killed (SIGKILL) again and again:

- a new version that takes the serving process down during its trial K times is reverted
  (``crash_loop``) and never installed again;
- an install that keeps getting killed before it commits is stopped (``restart_loop``).
"""

from __future__ import annotations

import pytest

from edgeship.fleet.broker import Mosquitto
from tests.support import models
from tests.support.loop_env import Fleet
from tests.support import wait_until
from tests.support.agent_process import (AgentProcess, assert_complete_and_verified, leftovers,
                                         served, write_config)
from tests.support.loop_env import LoopEnv


@pytest.fixture
def solo(tmp_path):
    broker = Mosquitto().start()
    fleet = Fleet(LoopEnv(broker.url, tmp_path), tmp_path)
    agents: list[AgentProcess] = []

    def make(**overrides) -> AgentProcess:
        cfg = write_config(tmp_path / "dev", "looper", broker.url, fleet.env.repo,
                           **overrides)
        agents.append(AgentProcess(cfg))
        return agents[-1]

    yield fleet, make
    for a in agents:
        a.stop()
    fleet.env.close()
    broker.cleanup()


def _serving_v1(fleet, agent: AgentProcess, fault: str) -> None:
    agent.start(fault)
    fleet.release("tiny", 1, models.good(1))
    wait_until(lambda: (served(agent.port, "tiny") or {}).get("version") == 1, 90, "v1")


def _crash_repeatedly(agent: AgentProcess, fault: str, times: int) -> None:
    for _ in range(times):
        assert agent.wait_exit(90) == -9
        agent.start(fault)


def _assert_reverted(fleet, agent: AgentProcess, reason: str, history_tail: list[str]):
    def settled():
        rec = agent.record("tiny")
        return rec.get("state") == "idle" and "rejected" in fleet.chain("looper", 2)
    wait_until(settled, 90, "the revert and the rejection of the re-announced version")
    failed = [e for e in fleet.events("looper", 2) if e["event"] == "failed"]
    assert [e["reason"] for e in failed] == [reason]
    rejected = [e for e in fleet.events("looper", 2) if e["event"] == "rejected"]
    assert rejected[-1]["reason"] == "version_blocked"  # the retained release: not retried
    rec = agent.record("tiny")
    assert rec["blocked"] == [2]
    assert rec["history"][-len(history_tail):] == history_tail
    assert served(agent.port, "tiny")["version"] == 1
    assert_complete_and_verified(agent.state_dir, "tiny", 1)
    assert leftovers(agent.state_dir) == []
    assert agent.alive


def test_a_version_that_crashes_the_agent_during_its_trial_is_reverted_after_k_crashes(solo):
    fleet, make = solo
    agent = make(trial_window_s=30.0, trial_max_crashes=2)
    crash = "version=2;trial:kill:0.5"  # this version takes the process down in its trial
    _serving_v1(fleet, agent, crash)
    fleet.release("tiny", 2, models.good(2))
    _crash_repeatedly(agent, crash, times=2)  # crash 1: trial resumed; crash 2: reverted
    _assert_reverted(fleet, agent, "crash_loop",
                     ["trial", "trial", "rolling_back", "failed", "idle"])
    recovering = [e for e in fleet.events("looper", 2) if e["event"] == "recovering"]
    assert [(e["from_state"], e["restarts"]) for e in recovering] == [("trial", 1),
                                                                     ("trial", 2)]


def test_an_install_that_keeps_getting_killed_is_stopped(solo):
    fleet, make = solo
    agent = make(max_update_restarts=2)
    crash = "version=2;downloading:kill:0.5"
    _serving_v1(fleet, agent, crash)
    fleet.release("tiny", 2, models.good(2))
    _crash_repeatedly(agent, crash, times=3)  # resumed twice, then stopped
    _assert_reverted(fleet, agent, "restart_loop",
                     ["downloading", "downloading", "rolling_back", "failed", "idle"])
