"""The update lifecycle as one explicit transition table, and its persisted record.

Every transition is saved (atomically, fsynced) *before* the side effect of the new state
runs, so a restarted agent knows where it was. An unknown (state, event) pair raises.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path

from agent.errors import EdgeshipError
from agent.fsutil import atomic_write

RECORD_SCHEMA = 1
MAX_HISTORY = 32


class State(StrEnum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGED = "staged"
    HEALTH_CHECK = "health_check"
    COMMITTED = "committed"
    ROLLING_BACK = "rolling_back"
    FAILED = "failed"


class Event(StrEnum):
    START = "start"
    DOWNLOADED = "downloaded"
    VERIFIED = "verified"
    CHECK = "check"
    HEALTHY = "healthy"
    ERROR = "error"
    ROLLED_BACK = "rolled_back"
    DONE = "done"


TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.IDLE, Event.START): State.DOWNLOADING,
    (State.DOWNLOADING, Event.DOWNLOADED): State.VERIFYING,
    (State.VERIFYING, Event.VERIFIED): State.STAGED,
    (State.STAGED, Event.CHECK): State.HEALTH_CHECK,
    (State.HEALTH_CHECK, Event.HEALTHY): State.COMMITTED,
    (State.DOWNLOADING, Event.ERROR): State.ROLLING_BACK,
    (State.VERIFYING, Event.ERROR): State.ROLLING_BACK,
    (State.STAGED, Event.ERROR): State.ROLLING_BACK,
    (State.HEALTH_CHECK, Event.ERROR): State.ROLLING_BACK,
    (State.ROLLING_BACK, Event.ROLLED_BACK): State.FAILED,
    (State.COMMITTED, Event.DONE): State.IDLE,
    (State.FAILED, Event.DONE): State.IDLE,
}

IN_FLIGHT = frozenset({State.DOWNLOADING, State.VERIFYING, State.STAGED, State.HEALTH_CHECK,
                       State.ROLLING_BACK})


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

    def advance(self, event: Event, *, reason: str | None = None,
                now: float | None = None) -> "UpdateRecord":
        new = next_state(self.state, event)
        history = (self.history + (new.value,))[-MAX_HISTORY:]
        return replace(self, state=new, reason=reason if reason is not None else self.reason,
                       updated_at=now if now is not None else time.time(), history=history)

    def begin(self, version: int, now: float | None = None) -> "UpdateRecord":
        base = replace(self, version=version, reason=None, history=(State.IDLE.value,))
        return base.advance(Event.START, now=now)

    def to_bytes(self) -> bytes:
        d = asdict(self)
        d["schema"] = RECORD_SCHEMA
        d["history"] = list(self.history)
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "UpdateRecord":
        d = json.loads(data)
        if d.pop("schema", None) != RECORD_SCHEMA:
            raise TransitionError("unknown update record schema")
        d["state"] = State(d["state"])
        d["history"] = tuple(d.get("history", ()))
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

    def all(self) -> list[UpdateRecord]:
        return [self.load(p.stem) for p in sorted(self.root.glob("*.json"))]
