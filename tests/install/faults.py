"""The kill tests' fault plan, plugged into the agent's install observer
(``edgeship.agent.update.observer.InstallObserver``); nothing of it ships in the product.

    --fault "version=7;seed=3;health_check:kill;rolling_back:error:0.5"

Rules are ``<state>:<action>[:<probability>]``; ``action`` is ``kill`` (a real SIGKILL of
this process: no clean-up, no atexit, like a power cut) or ``error`` (raise
:class:`FaultInjectedError`). The install driver passes several points inside each state;
at each one a matching rule fires with its probability, and at the state's last point it
always fires, so faults land at random points inside the state. Each rule fires at most
once per update (version) and process; ``version=N`` restricts the plan to the update to
version N, ``min_version=N`` to versions from N on.
"""

from __future__ import annotations

import os
import random
import signal
from dataclasses import dataclass, field

from edgeship.agent.errors import EdgeshipError, Reason

ACTIONS = ("kill", "error")
#: An injected error stands for "this update broke": a reason that is the model's fault,
#: so the driver blocks the version like a real failure of that kind.
INJECTED_REASON = Reason.HEALTH_CHECK_FAILED


class FaultInjectedError(EdgeshipError):
    reason_code = INJECTED_REASON


@dataclass
class FaultPlan:
    rules: dict[str, tuple[str, float]] = field(default_factory=dict)
    version: int | None = None
    min_version: int = 0
    seed: int = 0
    fired: set[tuple[str, int]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def point(self, state: str, version: int, label: str = "", *, last: bool = False) -> None:
        state = str(state)
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
                raise ValueError(f"fault plan: unknown action {action!r} in {part!r}")
            plan.rules[state] = (action, float(rest[0]) if rest else 0.5)
    plan.__post_init__()
    return plan
