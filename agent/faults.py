"""Fault injection for the table-driven kill tests (off unless ``EDGESHIP_FAULT`` is set).

    EDGESHIP_FAULT="version=7;seed=3;health_check:kill;rolling_back:error:0.5"

Rules are ``<state>:<action>[:<probability>]``; ``action`` is ``kill`` (a real SIGKILL of
this process: no clean-up, no atexit, like a power cut) or ``error`` (raise
:class:`FaultInjectedError`). The updater calls :meth:`FaultPlan.point` at several points
inside each state; at each one a matching rule fires with its probability, and at the
state's last point it always fires, so faults land at random points inside the state.
Each rule fires at most once per update (version) and process; ``version=N`` restricts
the plan to the update to version N, ``min_version=N`` to versions from N on.
"""

from __future__ import annotations

import os
import random
import signal
from dataclasses import dataclass, field

from edgeship.agent.errors import EdgeshipError, Reason

ENV = "EDGESHIP_FAULT"
ACTIONS = ("kill", "error")


class FaultInjectedError(EdgeshipError):
    reason_code = Reason.FAULT_INJECTED


@dataclass
class FaultPlan:
    rules: dict[str, tuple[str, float]] = field(default_factory=dict)
    version: int | None = None
    min_version: int = 0
    seed: int = 0
    fired: set[tuple[str, int]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    @property
    def active(self) -> bool:
        return bool(self.rules)

    def point(self, state: str, version: int, label: str = "", *, last: bool = False) -> None:
        rule = self.rules.get(state)
        if rule is None or (state, version) in self.fired:
            return
        if (self.version is not None and version != self.version) or \
                version < self.min_version:
            return
        action, probability = rule
        if not last and self._rng.random() >= probability:
            return
        self.fired.add((state, version))
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise FaultInjectedError(f"fault injected in {state} at {label or 'a step'}")


def parse_fault_plan(spec: str) -> FaultPlan:
    plan = FaultPlan()
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        if part.startswith("version="):
            plan.version = int(part.split("=", 1)[1])
        elif part.startswith("min_version="):
            plan.min_version = int(part.split("=", 1)[1])
        elif part.startswith("seed="):
            plan.seed = int(part.split("=", 1)[1])
        else:
            state, action, *rest = part.split(":")
            if action not in ACTIONS:
                raise ValueError(f"{ENV}: unknown action {action!r} in {part!r}")
            plan.rules[state] = (action, float(rest[0]) if rest else 0.5)
    plan.__post_init__()
    return plan


def from_env() -> FaultPlan:
    return parse_fault_plan(os.environ.get(ENV, ""))
