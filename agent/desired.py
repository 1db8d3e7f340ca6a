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

All-or-none (``hold``): :class:`HeldVersions` downloads, verifies, finalizes (inactive)
and health-checks the version, keeps it loaded and warm, and reports ``held``; nothing
switches. The commit (same version, no ``hold``) hands the warm copy to the install
lifecycle, which only records the steps already done and switches; a discard (the old
version) removes the held copy and reports ``discarded``. The hold is persisted in
``desired.json`` first, so an agent restarted while holding stages again and still waits.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from edgeship.agent.errors import EdgeshipError, Reason
from edgeship.common.fsutil import atomic_write
from edgeship.agent.lifecycle import UpdateRecord
from edgeship.agent.protocol import DesiredState
from edgeship.agent.runtime import load_runtime
from edgeship.agent.serving import LoadedModel, ModelServer
from edgeship.agent.store import InstalledModel, ModelStore

if TYPE_CHECKING:
    from edgeship.agent.updater import UpdateManager

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


class HeldVersions:
    """Versions staged and health-checked on a ``hold``, waiting for the fleet's commit
    (one per model, loaded and warm so the switch costs a symlink and a swap). Runs on the
    agent's update thread, like every install."""

    def __init__(self, updates: "UpdateManager") -> None:
        self.updates = updates
        self._held: dict[str, LoadedModel] = {}

    def version(self, model: str) -> int | None:
        held = self._held.get(model)
        return held.installed.version if held else None

    def stage(self, model: str, version: int) -> bool:
        """Idempotent: a version already held (or already served) is reported again."""
        u = self.updates
        active = u.store.active_version(model)
        if self.version(model) == version or active == version:
            u.report("held", model=model, version=version, hold=True)
            return True
        self.discard(model)
        if u.records.load(model).is_blocked(version):
            u.report("failed", model=model, version=version, hold=True,
                     reason=Reason.VERSION_BLOCKED.value,
                     detail="this version was reverted on this device before")
            return False
        try:
            installed = self._kept_or_download(model, version)
            check = u.health_check(installed)
            self._held[model] = self._shadow_or_warm(installed)
        except EdgeshipError as e:
            if u._stopping.is_set():  # the agent is stopping: it stages again on start
                return False
            self._failed(model, version, e)
            return False
        except Exception as e:  # a bug must not stop the update thread
            logger.exception("staging %s v%s failed", model, version)
            self._failed(model, version, EdgeshipError(f"{type(e).__name__}: {e}",
                                                       reason_code=Reason.INTERNAL))
            return False
        u.report("held", model=model, version=version, variant=installed.variant.id,
                 hold=True, max_abs_diff=check.max_abs_diff,
                 latency_ms=round(check.latency_ms, 3))
        return True

    def _shadow_or_warm(self, installed: InstalledModel) -> LoadedModel:
        """Where the release asks for shadow testing, the shadow run happens on hold
        (before the commit, so the switch stays simultaneous); it reports
        ``shadow_result`` and raises ``shadow_disagreement`` below the threshold."""
        u = self.updates
        if installed.manifest.shadow is None or u.server.find(installed.model) is None:
            return u.warm(installed)
        probe = UpdateRecord(model=installed.model, version=installed.version)  # not saved
        loaded, _ = u.shadow_run(probe, installed)
        return loaded

    def _kept_or_download(self, model: str, version: int) -> InstalledModel:
        """A copy finalized before (an agent restarted while holding) if its files still
        match; else download and verify into staging, and finalize it (not active)."""
        u = self.updates
        if version in u.store.versions(model):
            kept = u.store.load(model, version)
            if u.store.verify(kept):
                return kept
        staging = u.store.staging_dir(model, version)
        manifest, variant_id = u.download(model, version, staging)
        variant = u.verify_staged(manifest, variant_id, staging)
        return u.store.finalize(model, version, staging, manifest, variant)

    def _failed(self, model: str, version: int, e: EdgeshipError) -> None:
        from edgeship.agent.install import MODEL_FAULTS
        u = self.updates
        logger.warning("staging %s v%s on hold failed (%s): %s", model, version,
                       e.reason_code, e)
        u.remove_inactive(model, version)
        u.clean_downloads()
        if e.reason_code in MODEL_FAULTS:
            u.records.save(u.records.load(model).block(version))
        u.report("failed", model=model, version=version, hold=True,
                 reason=e.reason_code.value, detail=str(e)[:500])

    def take(self, model: str, version: int) -> LoadedModel | None:
        """The commit: the warm copy of ``version`` if it is the one held; a different
        held version is discarded."""
        if self.version(model) == version:
            return self._held.pop(model)
        self.discard(model)
        return None

    def discard(self, model: str) -> None:
        held = self._held.pop(model, None)
        if held is None:
            return
        version = held.installed.version
        if self.updates.store.active_version(model) != version:
            self.updates.remove_inactive(model, version)
        logger.info("discarded held %s v%s", model, version)
        self.updates.report("discarded", model=model, version=version)
