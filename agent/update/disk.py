"""What the update side keeps on the device's disk besides the records: model versions,
staging directories and partial downloads. Cleans up after an interrupted or failed update
(nothing is left once an update gives up), frees room when the disk is full, answers which
models the device has (names announced by anyone do not count), and finds a whole copy to
serve when the active one is damaged."""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

from edgeship.agent.errors import EdgeshipError, Reason
from edgeship.agent.protocol import StatusEvent
from edgeship.agent.store import InstalledModel, ModelStore
from edgeship.agent.update.download import Downloader, Report
from edgeship.agent.update.records import RecordStore

logger = logging.getLogger(__name__)


class DiskState:
    def __init__(self, store: ModelStore, records: RecordStore, downloader: Downloader,
                 report: Report) -> None:
        self.store = store
        self.records = records
        self.downloader = downloader
        self.report = report

    def clean_leftovers(self) -> list[Path]:
        """On start: staging directories, temp files, scratch and stale partial downloads."""
        removed = self.store.clean_leftovers() + self.records.clean_temp()
        self.downloader.clean_downloads()
        return removed + self.prune_partial()

    def knows(self, model: str) -> bool:
        """The device has ``model``: files or an update record for it."""
        return (self.store.root / model).exists() or self.records.exists(model)

    def model_count(self) -> int:
        return len({p.name for p in self.store.root.iterdir() if p.is_dir()} |
                   {r.model for r in self.records.all()})

    def _served(self) -> dict[str, int]:
        return {m: v for m in self.store.models()
                if (v := self.store.active_version(m)) is not None}

    def prune_partial(self, drop: tuple[tuple[str, int], ...] = ()) -> list[Path]:
        """Partial downloads nobody resumes: those of ``drop`` and of versions at or below
        the one their model serves."""
        return self.downloader.prune_resume(self._served(), drop)

    def remove_inactive(self, model: str, version: int) -> None:
        if self.store.active_version(model) != version:
            self.store.remove_version(model, version)
        shutil.rmtree(self.store.root / model / f".staging-{version}", ignore_errors=True)

    def free(self, model: str, version: int) -> None:
        """Best effort, before anything else is written on a full disk: the version's
        inactive copy, staging directory and partial download, and the scratch files."""
        with contextlib.suppress(OSError, EdgeshipError):
            self.remove_inactive(model, version)
        with contextlib.suppress(OSError):
            self.downloader.clean_downloads()
        with contextlib.suppress(OSError):
            self.prune_partial(drop=((model, version),))

    def verified_active(self, model: str) -> InstalledModel | None:
        """The active version if its files still match its manifest; else the newest other
        kept version that does (made active), so a damaged file is never served."""
        active = self.store.active(model)
        if active is None or self.store.verify(active):
            return active
        logger.error("%s v%s is damaged on disk (hash mismatch)", model, active.version)
        blocked = self.records.load(model).blocked
        for version in sorted(self.store.versions(model), reverse=True):
            if version == active.version or version in blocked:
                continue
            candidate = self.store.load(model, version)
            if self.store.verify(candidate):
                self.store.activate(model, version)
                self.report(StatusEvent.SERVING, model=model, version=version,
                            variant=candidate.variant.id, reason=Reason.HASH_MISMATCH.value,
                            detail=f"v{active.version} is damaged on disk")
                return candidate
        return None
