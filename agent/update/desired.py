"""Per-device desired state: the newest command the fleet sent this device, per model.

The fleet publishes a retained :class:`agent.protocol.DesiredState` per device and model,
each change with a larger ``seq``. :class:`DesiredTracker` remembers the newest command
accepted per model in ``<state_dir>/desired.json`` (atomic writes, persisted *before*
the device acts), so redelivered or out-of-order commands — including a stale retained
message after a restart — never move the device off the newest desired version.

This file holds what the fleet *asked* (version, ``hold``); what the device *did* about it
(staging, ``held``, commit, discard, revert) is in the update record
(``agent.update.table``). ``agent.update.planner`` turns both into the next step.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from edgeship.agent.protocol import DesiredState
from edgeship.common.fsutil import atomic_write

logger = logging.getLogger(__name__)

FILE_NAME = "desired.json"


class DesiredTracker:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / FILE_NAME
        self._lock = threading.Lock()
        self._state: dict[str, dict[str, Any]] = self._read()

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            raw = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            logger.error("ignoring unreadable %s: %s", self.path, e)
            return {}
        return {m: v for m, v in raw.items() if isinstance(v, dict)
                and isinstance(v.get("version"), int) and isinstance(v.get("seq"), int)}

    def accept(self, desired: DesiredState) -> bool:
        """True (and persisted) when ``desired`` is newer than anything seen for its model."""
        with self._lock:
            current = self._state.get(desired.model)
            if current is not None and desired.seq <= current["seq"]:
                return False
            self._state[desired.model] = {"version": desired.version, "seq": desired.seq,
                                          "rollout": desired.rollout, "hold": desired.hold}
            atomic_write(self.path, json.dumps(self._state, sort_keys=True).encode())
            return True

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
