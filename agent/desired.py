"""Per-device desired state (issue 6): what the fleet wants this device to run.

The fleet publishes a retained :class:`agent.protocol.DesiredState` per device and model,
each change with a larger ``seq``. :class:`DesiredTracker` remembers the newest ``seq``
accepted per model in ``<state_dir>/desired.json`` (atomic writes, persisted *before*
the device acts), so redelivered or out-of-order commands — including a stale retained
message after a restart — never move the device off the newest desired version.

A model with a desired state is governed by it: fleet-wide release announcements for that
model are ignored. Going back to an older version (a rollout rollback) reactivates the
copy the store kept of it, without a download, since the device's anti-rollback floor
refuses to install an older version afresh.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any, Callable

from agent.errors import EdgeshipError
from agent.fsutil import atomic_write
from agent.protocol import DesiredState
from agent.runtime import load_runtime
from agent.serving import LoadedModel, ModelServer
from agent.store import ModelStore

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
                                          "rollout": desired.rollout}
            atomic_write(self.path, json.dumps(self._state, sort_keys=True).encode())
            return True

    def version(self, model: str) -> int | None:
        with self._lock:
            entry = self._state.get(model)
            return entry["version"] if entry else None

    def governs(self, model: str) -> bool:
        return self.version(model) is not None

    def items(self) -> list[tuple[str, int]]:
        with self._lock:
            return [(m, v["version"]) for m, v in sorted(self._state.items())]


def reactivate_kept(store: ModelStore, server: ModelServer, *, model: str, version: int,
                    threads: int, providers: tuple[str, ...],
                    report: Callable[..., None]) -> bool:
    """Serve the kept copy of an older ``version`` again; False when none is kept."""
    if version not in store.versions(model):
        return False
    try:
        installed = store.load(model, version)
        runtime = load_runtime(installed.variant.runtime, installed.model_path,
                               threads=threads, providers=providers)
    except EdgeshipError as e:
        logger.warning("kept %s v%s cannot be loaded: %s", model, version, e)
        return False
    store.activate(model, version)
    server.swap(LoadedModel(installed, runtime))
    logger.info("reverted %s to kept v%s as desired", model, version)
    report("serving", model=model, version=version, variant=installed.variant.id,
           precision=installed.variant.precision, reverted=True)
    return True
