"""Table-driven crash tests: the real agent process is killed with SIGKILL (and, separately,
hit by an injected error) at random points inside each named state of an update, many times
per state. After every restart it must serve a complete, verified model (the old or the new
one, as the table says), its persisted history and its status events must show the expected
state chain, and no temporary file may remain.

How the kill lands: the agent process gets the fault plan ``"version=V;seed=S;<state>:kill:P"``
(tests/install/faults.py, plugged into the install driver's observer by agent_main.py); the
driver passes several points inside each state and the rule fires at each with probability
P, and always at the state's last point, so the SIGKILL (a real one, sent by the process to
itself: no clean-up runs) lands at a random point of that state. Each state has
its own device, broker and fleet, and the states run side by side (threads driving agent
processes) to keep the table inside the test-time budget. ``EDGESHIP_KILL_ROUNDS`` sets the
rounds per state (default 20, as the issue asks).
"""

from __future__ import annotations

import os
import random
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgeship.fleet.broker import Mosquitto
from tests.install.faults import INJECTED_REASON
from tests.support import models
from tests.support.loop_env import Fleet
from tests.support import wait_until
from tests.support.agent_process import (AgentProcess, assert_complete_and_verified, leftovers,
                                         served, write_config)
from tests.support.loop_env import LoopEnv

#: 20 rounds per state (the issue's minimum): about 90 s on 2 cores, run side by side.
ROUNDS = int(os.environ.get("EDGESHIP_KILL_ROUNDS", "20"))
PARALLEL = int(os.environ.get("EDGESHIP_KILL_PARALLEL", "4"))
KILL_PROBABILITY = 0.35

PRE = ["downloading", "verifying", "staged", "health_check"]
NORMAL = PRE + ["trial", "serving", "committed"]
HISTORY = ["idle"] + PRE + ["trial", "committed"]
RESUMED = ["recovering"] + NORMAL


@dataclass(frozen=True)
class KillCase:
    history_at_kill: tuple[str, ...] | None  # persisted history when the kill lands
    after_restart: tuple[str, ...]  # status events of that version after the restart
    serves_new: bool


def _upto(state: str) -> tuple[str, ...]:
    return tuple(HISTORY[:HISTORY.index(state) + 1])


KILL_TABLE = {
    "downloading": KillCase(_upto("downloading"), tuple(RESUMED), True),
    "verifying": KillCase(_upto("verifying"), tuple(RESUMED), True),
    "staged": KillCase(_upto("staged"), tuple(RESUMED), True),
    "health_check": KillCase(_upto("health_check"), tuple(RESUMED), True),
    "trial": KillCase(_upto("trial"), ("recovering", "committed"), True),
    "committed": KillCase(_upto("committed"), ("recovering",), True),
    # an error in a random earlier state starts the rollback; the kill lands inside it
    # (the retained announcement of the reverted version is then rejected: blocked)
    "rolling_back": KillCase(None, ("recovering", "failed", "rejected"), False),
}


class Driver:
    """One device: an agent process, its model, and the rounds of one table row."""

    def __init__(self, root: Path, state: str, kind: str) -> None:
        self.state, self.kind = state, kind
        self.device = f"{kind}-{state.replace('_', '-')}"
        self.model = "tiny"
        # its own broker and fleet: every agent installs every model released on a broker
        self.broker = Mosquitto().start()
        self.fleet = Fleet(LoopEnv(self.broker.url, root / self.device), root / self.device)
        cfg = write_config(root / self.device / "dev", self.device, self.broker.url,
                           self.fleet.env.repo, trial_window_s=0.1, trial_min_requests=1000)
        self.agent = AgentProcess(cfg)
        self.rng = random.Random(f"{kind}-{state}")
        self.active = 1
        self.err_state: dict[int, str] = {}

    # --- set-up -----------------------------------------------------------------------------

    def fault(self, version: int) -> str:
        spec = f"version={version};seed={self.rng.randrange(1 << 30)}"
        if self.state == "rolling_back":
            err = self.err_state.setdefault(version, self.rng.choice(PRE + ["trial"]))
            return f"{spec};{err}:error:0.5;rolling_back:kill:{KILL_PROBABILITY}"
        return f"{spec};{self.state}:kill:{KILL_PROBABILITY}"

    def start_serving_v1(self, fault: str = "") -> None:
        self.agent.start(fault)
        self.fleet.release(self.model, 1, models.good(1))
        self.settle(1)

    def settle(self, version: int, last_event: str | None = None, since: int = 0) -> None:
        def done() -> bool:
            rec = self.agent.record(self.model)
            if rec.get("state") != "idle" or rec.get("version") != version:
                return False
            if last_event and last_event not in self.fleet.chain(self.device, version, since):
                return False
            return served(self.agent.port, self.model) is not None
        wait_until(done, 90, f"{self.device} to settle on v{version}")

    # --- one kill round ---------------------------------------------------------------------

    def kill_round(self, version: int) -> None:
        case = KILL_TABLE[self.state]
        since = len(self.fleet.env.watcher.events)
        self.fleet.release(self.model, version, models.good(version))
        rc = self.agent.wait_exit(90)
        assert rc == -9, f"agent exited {rc}, not by SIGKILL"
        rec = self.agent.record(self.model)
        assert (rec["version"], rec["state"]) == (version, self.state), rec
        assert tuple(rec["history"]) == self.history_at_kill(version, case), rec["history"]
        self.assert_prefix(self.fleet.chain(self.device, version, since), version)
        self.agent.start(self.fault(version + 1))
        self.settle(version, case.after_restart[-1], since)
        # events after the restart start at "recovering" (a late event of the killed
        # process may still be on its way when the new one starts)
        chain = self.fleet.chain(self.device, version, since)
        assert chain.count("recovering") == 1, chain
        self.assert_prefix(chain[:chain.index("recovering")], version)
        after = chain[chain.index("recovering"):]
        assert tuple(after) == case.after_restart, after
        if case.serves_new:
            self.active = version
        else:
            failed, rejected = self.fleet.events(self.device, version, since=since)[-2:]
            assert failed["reason"] == INJECTED_REASON, failed
            assert rejected["reason"] == "version_blocked", rejected
        self.assert_serving()

    def history_at_kill(self, version: int, case: KillCase) -> tuple[str, ...]:
        if case.history_at_kill is not None:
            return case.history_at_kill
        return _upto(self.err_state[version]) + ("rolling_back",)

    def assert_prefix(self, pre: list[str], version: int) -> None:
        """Events sent before the kill: in order, none missing in between (the last ones
        may not have left the process before it died)."""
        full = NORMAL if self.state != "rolling_back" else \
            list(_upto(self.err_state[version])[1:]) + ["rolling_back"]
        pre = [e for e in pre if e != "serving" or self.state != "rolling_back"]
        assert pre == full[:len(pre)], (pre, full)

    def assert_serving(self) -> None:
        doc = served(self.agent.port, self.model)
        assert doc is not None and doc["version"] == self.active, (doc, self.active)
        assert_complete_and_verified(self.agent.state_dir, self.model, self.active)
        assert leftovers(self.agent.state_dir) == []

    # --- one error round --------------------------------------------------------------------

    def error_round(self, version: int) -> None:
        since = len(self.fleet.env.watcher.events)
        self.fleet.release(self.model, version, models.good(version))
        self.settle(version, "failed", since)
        chain = [e for e in self.fleet.chain(self.device, version, since) if e != "serving"]
        err = "trial" if self.state == "rolling_back" else self.state
        full = list(_upto(err)[1:]) + ["rolling_back", "failed"]
        assert chain == full, (chain, full)
        ev = self.fleet.events(self.device, version, since=since)[-1]
        assert ev["reason"] == INJECTED_REASON and ev["detail"].startswith("fault injected")
        rec = self.agent.record(self.model)
        assert tuple(rec["history"]) == _upto(err) + ("rolling_back", "failed", "idle")
        assert version in rec["blocked"]  # reverted: never tried again
        self.assert_serving()

    def run(self, rounds: int) -> None:
        try:
            if self.kind == "kill":
                self.start_serving_v1(self.fault(2))
                for i in range(rounds):
                    self.kill_round(2 + i)
            else:
                err = "trial" if self.state == "rolling_back" else self.state
                rule = f"{err}:error:0.5" + (";rolling_back:error:0.5"
                                             if self.state == "rolling_back" else "")
                self.start_serving_v1(f"min_version=2;seed={self.rng.randrange(1 << 30)};"
                                      f"{rule}")
                for i in range(rounds):
                    self.error_round(2 + i)
        except BaseException as e:
            log = self.agent.log.read_text()[-3000:] if self.agent.log.exists() else ""
            raise AssertionError(f"{self.device}: {e!r}\n{traceback.format_exc()}\n"
                                 f"--- agent log tail ---\n{log}") from e
        finally:
            self.agent.stop()
            self.fleet.env.close()
            self.broker.cleanup()


def _run_table(root: Path, kind: str, states: list[str]) -> None:
    drivers = [Driver(root, s, kind) for s in states]
    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        futures = [pool.submit(d.run, ROUNDS) for d in drivers]
    errors = [str(f.exception()) for f in futures if f.exception() is not None]
    assert not errors, "\n\n".join(errors)


@pytest.mark.parametrize("states", [PRE, ["trial", "committed", "rolling_back"]],
                         ids=["before-activation", "after-activation"])
def test_kill_9_at_random_points_in_every_state_recovers_to_a_verified_model(tmp_path,
                                                                            states):
    _run_table(tmp_path, "kill", states)


def test_an_error_in_every_state_rolls_back_to_the_old_model(tmp_path):
    _run_table(tmp_path, "error", PRE + ["trial", "rolling_back"])
