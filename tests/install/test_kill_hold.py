"""The kill/error table for all-or-none holds and going back to a kept version, with real
agent processes (as tests/install/test_kill.py does for the install states): SIGKILL at
random points inside a hold's check, while ``held`` (from outside), inside ``commit``,
``discard`` and ``revert``, and an injected error in a hold's check and in ``commit``. After
each restart the device must end where the table says, serving a complete, verified model,
with its record's history showing the way and no temporary file left.

Rounds per row: ``EDGESHIP_HOLD_KILL_ROUNDS`` (default 2)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


from edgeship.agent.protocol import DesiredState, Topics
from tests.install.faults import INJECTED_REASON
from tests.install.test_kill import KILL_PROBABILITY, Driver
from tests.support import models, wait_until

ROUNDS = int(os.environ.get("EDGESHIP_HOLD_KILL_ROUNDS", "2"))
CHECK = ["downloading", "verifying", "staged", "health_check"]


class HoldDriver(Driver):
    """One device and one row: ``kind`` is kill or error, ``state`` the state it lands in."""

    def __init__(self, root: Path, state: str, kind: str) -> None:
        super().__init__(root, state, f"hold-{kind}")
        self.seq = 0

    def desire(self, version: int, hold: bool = False) -> None:
        self.seq += 1
        self.fleet.env.publish(Topics.desired(self.device), DesiredState(
            self.model, version, self.seq, hold=hold).to_bytes(), retain=True)

    def plan(self, version: int) -> str:
        """The fault plan the agent process starts with, for the round of ``version``."""
        seed = f"seed={self.rng.randrange(1 << 30)}"
        action = "kill" if self.kind == "hold-kill" else "error"
        target = version - 1 if self.state == "revert" else version
        if self.state == "held":
            return ""  # the test kills it from outside while it rests
        only = "version" if action == "kill" else "min_version"  # errors: no restart
        return f"{only}={target};{seed};{self.state}:{action}:{KILL_PROBABILITY}"

    def wait_event(self, event: str, version: int, since: int) -> None:
        wait_until(lambda: event in self.fleet.chain(self.device, version, since), 90,
                   f"{self.device}: {event} of v{version}")

    def settled_record(self) -> dict:
        """The record once it rests: the ``failed`` event goes out before the record's
        step to idle is saved."""
        def rested() -> dict | None:
            rec = self.agent.record(self.model)
            return rec if rec["state"] == "idle" else None
        return wait_until(rested, 30, f"{self.device}: the record back to idle")

    def killed_in(self, state: str, version: int) -> dict:
        rc = self.agent.wait_exit(90)
        assert rc == -9, f"agent exited {rc}, not by SIGKILL"
        rec = self.agent.record(self.model)
        assert (rec["version"], rec["state"]) == (version, state), rec
        return rec

    def restart(self, version: int) -> int:
        since = len(self.fleet.env.watcher.events)
        self.agent.start(self.plan(version + 1))
        return since

    # --- one round per row ------------------------------------------------------------------

    def round(self, version: int) -> None:
        since = len(self.fleet.env.watcher.events)
        self.fleet.release(self.model, version, models.good(version), announce=False)
        if self.state == "revert":
            return self.revert_round(version, since)
        self.desire(version, hold=True)
        if self.state in CHECK and self.kind == "hold-error":
            self.wait_event("failed", version, since)
            [failed] = [e for e in self.fleet.events(self.device, version, since=since)
                        if e["event"] == "failed"]
            assert failed["hold"] is True and failed["reason"] == INJECTED_REASON, failed
            assert self.fleet.chain(self.device, version, since) == ["failed"]  # quiet
            rec = self.settled_record()
            assert rec["history"][-3:] == ["rolling_back", "failed", "idle"], rec
            assert version in rec["blocked"]
            return self.assert_serving()
        if self.state in CHECK:
            rec = self.killed_in(self.state, version)
            assert rec["hold"] is True and rec["history"][-1] == self.state, rec
            since = self.restart(version)
        self.wait_event("held", version, since)
        assert self.agent.record(self.model)["state"] == "held"
        assert "serving" not in self.fleet.chain(self.device, version)  # nothing switched
        if self.state == "held":
            self.agent.kill()
            since = self.restart(version)
            self.wait_event("held", version, since)  # staged again from the kept copy
            assert self.agent.record(self.model)["restarts"] == 0
        if self.state == "discard":
            return self.discard_round(version)
        self.commit_round(version)

    def commit_round(self, version: int) -> None:
        since = len(self.fleet.env.watcher.events)
        self.desire(version)
        if self.state == "commit" and self.kind == "hold-error":
            self.wait_event("failed", version, since)
            chain = self.fleet.chain(self.device, version, since)
            assert chain == ["rolling_back", "failed"], chain
            rec = self.settled_record()
            assert rec["history"][-5:] == ["held", "commit", "rolling_back", "failed",
                                           "idle"], rec
            assert version in rec["blocked"]
            return self.assert_serving()
        way = ["held", "commit", "trial", "committed", "idle"]
        if self.state == "commit":
            self.killed_in("commit", version)
            since = self.restart(version)
            self.settle(version, "committed", since)
            after = self.fleet.chain(self.device, version, since)
            assert after[after.index("recovering"):] == ["recovering", "trial", "serving",
                                                         "committed"], after
            way.insert(1, "commit")  # done again after the restart
        else:
            self.settle(version, "committed", since)
        rec = self.agent.record(self.model)
        assert rec["history"][-len(way):] == way, rec
        self.active = version
        self.assert_serving()

    def discard_round(self, version: int) -> None:
        self.desire(self.active)  # the rollout rolled back: drop what is held
        self.killed_in("discard", version)
        since = self.restart(version)
        self.wait_event("discarded", version, since)
        wait_until(lambda: self.agent.record(self.model).get("state") == "idle", 30,
                   "the discard to finish")
        rec = self.agent.record(self.model)
        assert rec["history"][-4:] == ["held", "discard", "discard", "idle"], rec
        assert not (self.agent.state_dir / "models" / self.model / str(version)).exists()
        self.assert_serving()

    def revert_round(self, version: int, since: int) -> None:
        self.desire(version)
        self.settle(version, "committed", since)
        self.active = version
        since = len(self.fleet.env.watcher.events)
        self.desire(version - 1)  # a rollout's rollback: the kept copy serves again
        self.killed_in("revert", version - 1)
        since = self.restart(version)
        self.settle(version - 1, "serving", since)
        ev = [e for e in self.fleet.events(self.device, version - 1, since=since)
              if e["event"] == "serving"][-1]
        assert ev.get("reverted") is True, ev
        rec = self.agent.record(self.model)
        assert rec["history"][-3:] == ["revert", "revert", "idle"], rec
        self.active = version - 1
        self.assert_serving()

    def boot(self) -> "HoldDriver":
        """Start the agent and wait until it listens: the next device's broker then cannot
        draw the API port this one was given."""
        self.agent.start(self.plan(2))
        wait_until(lambda: self.agent.log.exists() and b"serving on" in
                   self.agent.log.read_bytes(), 60, f"{self.device} to listen")
        return self

    def run(self, rounds: int) -> None:
        try:
            self.fleet.release(self.model, 1, models.good(1))
            self.settle(1)
            for i in range(rounds):
                self.round(2 + i)  # revert rows: install v, go back to the kept v-1
        except BaseException as e:
            log = self.agent.log.read_text()[-3000:] if self.agent.log.exists() else ""
            raise AssertionError(f"{self.device}: {e!r}\n--- agent log tail ---\n{log}") from e
        finally:
            self.agent.stop()
            self.fleet.env.close()
            self.broker.cleanup()


ROWS = [("health_check", "kill"), ("held", "kill"), ("commit", "kill"), ("discard", "kill"),
        ("revert", "kill"), ("health_check", "error"), ("commit", "error")]


def test_kill_9_and_errors_in_the_hold_commit_discard_and_revert_states(tmp_path):
    drivers = [HoldDriver(tmp_path, state, kind).boot() for state, kind in ROWS]
    with ThreadPoolExecutor(max_workers=len(drivers)) as pool:
        futures = [pool.submit(d.run, ROUNDS) for d in drivers]
    errors = [str(f.exception()) for f in futures if f.exception() is not None]
    assert not errors, "\n\n".join(errors)
