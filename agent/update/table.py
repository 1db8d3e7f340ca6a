"""Every state a device's update can be in, as one transition table, and its record.

Pure: no disk, no clock unless given. The record is saved (``records.RecordStore``) *before*
the action of its new state runs, so a restarted agent knows where it was; an unknown
(state, event) pair raises :class:`TransitionError`.

    idle → downloading → verifying → staged → health_check [→ shadow] → trial → committed → idle
                 any in-flight state --error--> rolling_back → failed → idle

All-or-none (``hold``): the same steps up to the check end in ``held`` (staged, checked,
warm, not serving); the fleet's commit goes ``held → commit → trial → …``, its discard
``held → discard → idle``. Going back to an older version the store kept (a rollout's
rollback) is ``idle → revert → idle``.

After a restart (``RESUME``): an install that had not switched the active model yet starts
again from ``downloading`` (a held one re-checks its kept copy on the way); a trial continues
(the new version serves again); ``commit``, ``discard``, ``revert`` and ``rolling_back`` are
done again (each is idempotent). ``restarts`` counts such resumes of one update, so a loop
breaker can stop an update that keeps taking the agent down. Versions reverted for a reason
that is the model's fault are remembered in ``blocked`` and never installed again.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace

from edgeship.agent.errors import TransitionError
from edgeship.common.compat import StrEnum

RECORD_SCHEMA = 2
MAX_HISTORY = 32
MAX_BLOCKED_VERSIONS = 64


class State(StrEnum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGED = "staged"
    HEALTH_CHECK = "health_check"
    SHADOW = "shadow"
    HELD = "held"  # all-or-none: checked and warm, waiting for the fleet's commit
    COMMIT = "commit"  # the fleet's commit: switch to the held copy
    DISCARD = "discard"  # the fleet's discard: remove the held copy
    REVERT = "revert"  # serve a kept older version again (no download)
    TRIAL = "trial"
    COMMITTED = "committed"
    ROLLING_BACK = "rolling_back"
    FAILED = "failed"


class Event(StrEnum):
    START = "start"
    DOWNLOADED = "downloaded"
    VERIFIED = "verified"
    CHECK = "check"
    HEALTHY = "healthy"
    SHADOW = "shadow"
    AGREED = "agreed"
    HOLD = "hold"
    COMMIT = "commit"
    SWITCH = "switch"
    DISCARD = "discard"
    REVERT = "revert"
    PASSED = "passed"
    RESUME = "resume"
    ERROR = "error"
    ROLLED_BACK = "rolled_back"
    DONE = "done"


S, E = State, Event

TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.IDLE, E.START): S.DOWNLOADING,
    (S.DOWNLOADING, E.DOWNLOADED): S.VERIFYING,
    (S.VERIFYING, E.VERIFIED): S.STAGED,
    (S.STAGED, E.CHECK): S.HEALTH_CHECK,
    (S.HEALTH_CHECK, E.HEALTHY): S.TRIAL,
    (S.HEALTH_CHECK, E.SHADOW): S.SHADOW,
    (S.SHADOW, E.AGREED): S.TRIAL,
    (S.HEALTH_CHECK, E.HOLD): S.HELD,
    (S.SHADOW, E.HOLD): S.HELD,
    (S.HELD, E.COMMIT): S.COMMIT,
    (S.COMMIT, E.SWITCH): S.TRIAL,
    (S.HELD, E.DISCARD): S.DISCARD,
    (S.DISCARD, E.DONE): S.IDLE,
    (S.IDLE, E.REVERT): S.REVERT,
    (S.REVERT, E.DONE): S.IDLE,
    (S.TRIAL, E.PASSED): S.COMMITTED,
    (S.DOWNLOADING, E.ERROR): S.ROLLING_BACK,
    (S.VERIFYING, E.ERROR): S.ROLLING_BACK,
    (S.STAGED, E.ERROR): S.ROLLING_BACK,
    (S.HEALTH_CHECK, E.ERROR): S.ROLLING_BACK,
    (S.SHADOW, E.ERROR): S.ROLLING_BACK,
    (S.COMMIT, E.ERROR): S.ROLLING_BACK,
    (S.DISCARD, E.ERROR): S.ROLLING_BACK,
    (S.REVERT, E.ERROR): S.ROLLING_BACK,
    (S.TRIAL, E.ERROR): S.ROLLING_BACK,
    (S.DOWNLOADING, E.RESUME): S.DOWNLOADING,
    (S.VERIFYING, E.RESUME): S.DOWNLOADING,
    (S.STAGED, E.RESUME): S.DOWNLOADING,
    (S.HEALTH_CHECK, E.RESUME): S.DOWNLOADING,
    (S.SHADOW, E.RESUME): S.DOWNLOADING,
    (S.HELD, E.RESUME): S.DOWNLOADING,
    (S.COMMIT, E.RESUME): S.COMMIT,
    (S.DISCARD, E.RESUME): S.DISCARD,
    (S.REVERT, E.RESUME): S.REVERT,
    (S.TRIAL, E.RESUME): S.TRIAL,
    (S.ROLLING_BACK, E.RESUME): S.ROLLING_BACK,
    (S.ROLLING_BACK, E.ROLLED_BACK): S.FAILED,
    (S.COMMITTED, E.DONE): S.IDLE,
    (S.FAILED, E.DONE): S.IDLE,
}

#: Resumed after a restart (a held version is waiting, not in flight, but is re-checked).
IN_FLIGHT = frozenset({S.DOWNLOADING, S.VERIFYING, S.STAGED, S.HEALTH_CHECK, S.SHADOW,
                       S.HELD, S.COMMIT, S.DISCARD, S.REVERT, S.TRIAL, S.ROLLING_BACK})
#: In these states the active model has not been switched yet: resuming means reinstalling.
BEFORE_ACTIVATION = frozenset({S.DOWNLOADING, S.VERIFYING, S.STAGED, S.HEALTH_CHECK,
                               S.SHADOW})
#: Where the driver stops and waits for the next command.
RESTING = frozenset({S.IDLE, S.HELD})


def next_state(state: State, event: Event) -> State:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise TransitionError(f"no transition from {state} on {event}") from None


@dataclass(frozen=True)
class UpdateRecord:
    model: str
    version: int = 0
    state: State = State.IDLE
    reason: str | None = None
    updated_at: float = 0.0
    history: tuple[str, ...] = field(default_factory=tuple)
    previous_version: int | None = None  # what to go back to if this update is reverted
    restarts: int = 0  # agent restarts while this update was in flight (loop breaker)
    blocked: tuple[int, ...] = field(default_factory=tuple)  # reverted: never retried
    hold: bool = False  # all-or-none: stage and check, then wait in HELD for the commit

    def advance(self, event: Event, *, reason: str | None = None,
                now: float | None = None) -> "UpdateRecord":
        new = next_state(self.state, event)
        history = (self.history + (new.value,))[-MAX_HISTORY:]
        restarts = 0 if new == State.HELD else self.restarts  # resting: a new count
        hold = self.hold and new != State.COMMIT  # committed: an update like any other
        return replace(self, state=new, reason=reason if reason is not None else self.reason,
                       updated_at=now if now is not None else time.time(), history=history,
                       restarts=restarts, hold=hold)

    def begin(self, version: int, previous_version: int | None = None,
              now: float | None = None, *, hold: bool = False,
              event: Event = Event.START) -> "UpdateRecord":
        base = replace(self, version=version, reason=None, history=(State.IDLE.value,),
                       previous_version=previous_version, restarts=0, hold=hold)
        return base.advance(event, now=now)

    def resumed(self, now: float | None = None) -> "UpdateRecord":
        """The agent restarted while this update was in flight."""
        return replace(self.advance(Event.RESUME, now=now), restarts=self.restarts + 1)

    def block(self, version: int) -> "UpdateRecord":
        if version in self.blocked:
            return self
        return replace(self, blocked=(self.blocked + (version,))[-MAX_BLOCKED_VERSIONS:])

    def is_blocked(self, version: int) -> bool:
        return version in self.blocked

    def to_bytes(self) -> bytes:
        d = asdict(self)
        d["schema"] = RECORD_SCHEMA
        d["history"] = list(self.history)
        d["blocked"] = list(self.blocked)
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "UpdateRecord":
        d = json.loads(data)
        if d.pop("schema", None) not in (1, RECORD_SCHEMA):
            raise TransitionError("unknown update record schema")
        d["state"] = State(d["state"])
        d["history"] = tuple(d.get("history", ()))
        d["blocked"] = tuple(int(v) for v in d.get("blocked", ()))
        d["hold"] = bool(d.get("hold", False))
        return cls(**d)
