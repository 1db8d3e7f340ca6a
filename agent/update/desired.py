"""Per-device desired state: the newest command the fleet sent this device, per model.

The fleet publishes a retained :class:`agent.protocol.DesiredState` per device and model,
ordered by ``(epoch, seq)`` (the registry's epoch, then its sequence number).
:class:`DesiredTracker` remembers the newest command accepted per model in
``<state_dir>/desired.json`` (atomic writes, persisted *before* the device acts), so
redelivered or out-of-order commands — including a stale retained message after a restart
— never move the device off the newest desired version, while a recreated registry (a
newer epoch) is followed at once.

A command signed by the fleet (the repository's timestamp key, checked against the
device's trusted TUF root by ``verify``) is the only kind that can capture the order once
the device has seen one: after the first signed command, unsigned ones and ones with a bad
signature are refused (``bad_signature``), so nobody else on the broker can make the
device ignore its fleet with a huge ``seq``.

This file holds what the fleet *asked* (version, ``hold``); what the device *did* about it
(staging, ``held``, commit, discard, revert) is in the update record
(``agent.update.table``). ``agent.update.planner`` turns both into the next step.
"""

from __future__ import annotations

import json
import logging
import threading
from enum import Enum
from pathlib import Path
from typing import Any, Callable

from edgeship.agent.errors import Reason, VerificationError
from edgeship.agent.protocol import DesiredState
from edgeship.common.fsutil import atomic_write

logger = logging.getLogger(__name__)

FILE_NAME = "desired.json"


SIGNED_KEY = "_signed"  # not a model name (those start with a letter or digit)


class Verdict(Enum):
    """What became of a desired state; only ACCEPTED is true."""

    ACCEPTED = "accepted"
    SAME = "same"  # redelivered (the retained message after a reconnect)
    STALE = "stale"  # older than the command the device follows

    def __bool__(self) -> bool:
        return self is Verdict.ACCEPTED


class DesiredTracker:
    """``verify(desired)``: raises :class:`VerificationError` unless the command's signature
    is the fleet's; None (tests, a lab without keys) accepts any signature unchecked."""

    def __init__(self, state_dir: Path,
                 verify: Callable[[DesiredState], None] | None = None) -> None:
        self.path = Path(state_dir) / FILE_NAME
        self.verify = verify
        self._lock = threading.Lock()
        self._signed = False
        self._state: dict[str, dict[str, Any]] = self._read()

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            raw = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            logger.error("ignoring unreadable %s: %s", self.path, e)
            return {}
        self._signed = raw.get(SIGNED_KEY) is True
        return {m: v for m, v in raw.items() if isinstance(v, dict)
                and isinstance(v.get("version"), int) and isinstance(v.get("seq"), int)}

    def accept(self, desired: DesiredState) -> Verdict:
        """ACCEPTED (and persisted) when ``desired`` is newer than anything seen for its
        model; raises :class:`VerificationError` for a bad or missing signature."""
        self._check_signature(desired)
        with self._lock:
            current = self._state.get(desired.model)
            if current is not None:
                order = (current.get("epoch", 0), current["seq"])
                if desired.order <= order:
                    return Verdict.SAME if desired.order == order else Verdict.STALE
            self._state[desired.model] = {"version": desired.version, "seq": desired.seq,
                                          "epoch": desired.epoch, "rollout": desired.rollout,
                                          "hold": desired.hold}
            self._signed = self._signed or desired.sig is not None
            doc: dict[str, Any] = dict(self._state)
            if self._signed:
                doc[SIGNED_KEY] = True
            atomic_write(self.path, json.dumps(doc, sort_keys=True).encode())
            return Verdict.ACCEPTED

    def _check_signature(self, desired: DesiredState) -> None:
        if desired.sig is None:
            if self._signed:
                raise VerificationError(
                    f"unsigned desired state for {desired.model} refused: this device "
                    "follows signed ones", reason_code=Reason.BAD_SIGNATURE)
            return
        if self.verify is not None:
            self.verify(desired)

    def version(self, model: str) -> int | None:
        with self._lock:
            entry = self._state.get(model)
            return entry["version"] if entry else None

    def holds(self, model: str) -> bool:
        """The newest command says: stage this version, do not switch yet."""
        with self._lock:
            return bool(self._state.get(model, {}).get("hold"))

    def governs(self, model: str) -> bool:
        return self.version(model) is not None

    def items(self) -> list[tuple[str, int]]:
        with self._lock:
            return [(m, v["version"]) for m, v in sorted(self._state.items())]
