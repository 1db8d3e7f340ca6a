"""The update lifecycle as one explicit transition table, and its persisted record.

Every transition is saved (atomically, fsynced) *before* the side effect of the new state
runs, so a restarted agent knows where it was. An unknown (state, event) pair raises.

    IDLE → DOWNLOADING → VERIFYING → STAGED → HEALTH_CHECK [→ SHADOW] → TRIAL → COMMITTED
                       any in-flight state --error--> ROLLING_BACK → FAILED

After a restart (``RESUME``): an install that had not switched the active model yet starts
again from DOWNLOADING; a TRIAL continues (the new version serves again); a ROLLING_BACK
finishes. ``restarts`` counts such resumes of one update, so a loop breaker can stop an
update that keeps taking the agent down. Versions that were reverted for a reason that is
the model's fault are remembered in ``blocked`` and never installed again.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from edgeship.agent.errors import EdgeshipError
from edgeship.agent.fsutil import atomic_write
from edgeship.compat import StrEnum

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
    PASSED = "passed"
    RESUME = "resume"
    ERROR = "error"
    ROLLED_BACK = "rolled_back"
    DONE = "done"


TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.IDLE, Event.START): State.DOWNLOADING,
    (State.DOWNLOADING, Event.DOWNLOADED): State.VERIFYING,
    (State.VERIFYING, Event.VERIFIED): State.STAGED,
    (State.STAGED, Event.CHECK): State.HEALTH_CHECK,
    (State.HEALTH_CHECK, Event.HEALTHY): State.TRIAL,
    (State.HEALTH_CHECK, Event.SHADOW): State.SHADOW,
    (State.SHADOW, Event.AGREED): State.TRIAL,
    (State.TRIAL, Event.PASSED): State.COMMITTED,
    (State.DOWNLOADING, Event.ERROR): State.ROLLING_BACK,
    (State.VERIFYING, Event.ERROR): State.ROLLING_BACK,
    (State.STAGED, Event.ERROR): State.ROLLING_BACK,
    (State.HEALTH_CHECK, Event.ERROR): State.ROLLING_BACK,
    (State.SHADOW, Event.ERROR): State.ROLLING_BACK,
    (State.TRIAL, Event.ERROR): State.ROLLING_BACK,
    (State.DOWNLOADING, Event.RESUME): State.DOWNLOADING,
    (State.VERIFYING, Event.RESUME): State.DOWNLOADING,
    (State.STAGED, Event.RESUME): State.DOWNLOADING,
    (State.HEALTH_CHECK, Event.RESUME): State.DOWNLOADING,
    (State.SHADOW, Event.RESUME): State.DOWNLOADING,
    (State.TRIAL, Event.RESUME): State.TRIAL,
    (State.ROLLING_BACK, Event.RESUME): State.ROLLING_BACK,
    (State.ROLLING_BACK, Event.ROLLED_BACK): State.FAILED,
    (State.COMMITTED, Event.DONE): State.IDLE,
    (State.FAILED, Event.DONE): State.IDLE,
}

IN_FLIGHT = frozenset({State.DOWNLOADING, State.VERIFYING, State.STAGED, State.HEALTH_CHECK,
                       State.SHADOW, State.TRIAL, State.ROLLING_BACK})
#: In these states the active model has not been switched yet: resuming means reinstalling.
BEFORE_ACTIVATION = frozenset({State.DOWNLOADING, State.VERIFYING, State.STAGED,
                               State.HEALTH_CHECK, State.SHADOW})


class TransitionError(EdgeshipError):
    pass


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

    def advance(self, event: Event, *, reason: str | None = None,
                now: float | None = None) -> "UpdateRecord":
        new = next_state(self.state, event)
        history = (self.history + (new.value,))[-MAX_HISTORY:]
        return replace(self, state=new, reason=reason if reason is not None else self.reason,
                       updated_at=now if now is not None else time.time(), history=history)

    def begin(self, version: int, previous_version: int | None = None,
              now: float | None = None) -> "UpdateRecord":
        base = replace(self, version=version, reason=None, history=(State.IDLE.value,),
                       previous_version=previous_version, restarts=0)
        return base.advance(Event.START, now=now)

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
        return cls(**d)


class RecordStore:
    """Persists one UpdateRecord per model under ``<state>/updates/<model>.json``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def load(self, model: str) -> UpdateRecord:
        path = self.root / f"{model}.json"
        if not path.exists():
            return UpdateRecord(model=model)
        try:
            return UpdateRecord.from_bytes(path.read_bytes())
        except (ValueError, TypeError, KeyError, TransitionError):
            return UpdateRecord(model=model, state=State.FAILED, reason="corrupt_record")

    def save(self, record: UpdateRecord) -> None:
        atomic_write(self.root / f"{record.model}.json", record.to_bytes())

    def clean_temp(self) -> list[Path]:
        """Temp files of a save interrupted by a crash."""
        removed = []
        for p in self.root.glob(".*.tmp"):
            p.unlink(missing_ok=True)
            removed.append(p)
        return removed

    def all(self) -> list[UpdateRecord]:
        return [self.load(p.stem) for p in sorted(self.root.glob("*.json"))]
