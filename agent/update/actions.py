"""The install driver's actions: one method per state of ``agent.update.table``, each doing
that state's work and persisting the next state (``UpdateDriver`` runs them in turn).

:class:`StateActions` is a mixin of :class:`~agent.update.driver.UpdateDriver`: the driver
owns the store, the records, the server and the drive (commands, recovery, rollback); the
actions do the work of one state each and report it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgeship.agent.errors import EdgeshipError, Reason
from edgeship.agent.manifest import Manifest
from edgeship.agent.protocol import StatusEvent
from edgeship.agent.serving import LoadedModel, ModelServer
from edgeship.agent.store import InstalledModel, ModelStore
from edgeship.agent.update.disk import DiskState
from edgeship.agent.update.download import Downloader, Report
from edgeship.agent.update.observer import InstallObserver
from edgeship.agent.update.records import RecordStore
from edgeship.agent.update.steps import Steps
from edgeship.agent.update.table import Event, State, UpdateRecord

logger = logging.getLogger(__name__)

ROLLBACK_ATTEMPTS = 3

#: Failed for one of these and the partial download is kept: the next try resumes it.
RESUMABLE = frozenset({Reason.TRANSFER_TIMEOUT, Reason.TRANSFER_FAILED, Reason.INTERRUPTED})

#: Entering these states is reported with the state's name as the event.
REPORTED = frozenset({State.VERIFYING, State.STAGED, State.HEALTH_CHECK, State.SHADOW,
                      State.TRIAL, State.COMMITTED})
#: What an all-or-none hold reports before its commit (the fleet waits for these).
HOLD_EVENTS = frozenset({StatusEvent.HELD, StatusEvent.FAILED, StatusEvent.DISCARDED,
                         StatusEvent.SHADOW_RESULT})
@dataclass
class Work:
    """What one update carries from action to action in memory (the record is on disk)."""

    staging: Path | None = None
    manifest: Manifest | None = None
    variant_id: str | None = None
    installed: InstalledModel | None = None
    loaded: LoadedModel | None = None
    health: dict[str, Any] = field(default_factory=dict)
    switched: bool = False  # a resumed trial: the new version serves already
    detail: str = ""  # why it is rolling back


Action = Callable[[UpdateRecord, Work], UpdateRecord]


class StateActions:
    """What each state does; the attributes are the driver's (set in its ``__init__``)."""

    store: ModelStore
    records: RecordStore
    server: ModelServer
    downloader: Downloader
    steps: Steps
    report: Report
    observer: InstallObserver
    disk: DiskState
    superseded: Callable[[str, int], bool]
    _held: dict[str, LoadedModel]

    def _step(self, record: UpdateRecord, event: Event, **extra: Any) -> UpdateRecord:
        new = self.records.save(record.advance(event))
        if new.state in REPORTED:
            self._report(new, StatusEvent(new.state.value), **extra)
        return new

    def _report(self, record: UpdateRecord, event: StatusEvent, **extra: Any) -> None:
        if record.hold and event not in HOLD_EVENTS:
            return
        self.report(event, model=record.model, version=record.version, **extra)

    def _point(self, record: UpdateRecord, label: str, last: bool = False) -> None:
        self.observer.point(record.state, record.version, label, last=last)

    def _watching(self, record: UpdateRecord) -> Callable[[], None]:
        return lambda: self._point(record, "watching")

    # --- one action per state ---------------------------------------------------------------

    def _downloading(self, record: UpdateRecord, work: Work) -> UpdateRecord:
        self._point(record, "started")
        kept = self._kept(record) if record.hold else None
        if kept is not None:  # staged before this restart and still whole
            work.installed = kept
        else:
            work.staging = self.store.staging_dir(record.model, record.version)
            work.manifest, work.variant_id = self.downloader.download(
                record.model, record.version, work.staging)
        self._point(record, "downloaded", last=True)
        return self._step(record, Event.DOWNLOADED)

    def _verifying(self, record: UpdateRecord, work: Work) -> UpdateRecord:
        self._point(record, "entered")
        if work.installed is None:
            assert work.manifest is not None and work.variant_id and work.staging
            self.downloader.verify_staged(work.manifest, work.variant_id, work.staging)
        self._point(record, "verified", last=True)
        return self._step(record, Event.VERIFIED)

    def _staged(self, record: UpdateRecord, work: Work) -> UpdateRecord:
        self._point(record, "entered")
        if work.installed is None:
            assert work.manifest is not None and work.variant_id and work.staging
            work.installed = self.store.finalize(
                record.model, record.version, work.staging, work.manifest,
                work.manifest.variant(work.variant_id))
        self._point(record, "finalized", last=True)
        return self._step(record, Event.CHECK)

    def _health_check(self, record: UpdateRecord, work: Work) -> UpdateRecord:
        self._point(record, "entered")
        installed = self._installed(work)
        report = self.steps.health_check(installed)
        self._point(record, "checked", last=True)
        work.health = {"max_abs_diff": report.max_abs_diff,
                       "latency_ms": round(report.latency_ms, 3)}
        if self.steps.wants_shadow(installed):
            return self._step(record, Event.SHADOW, **work.health)
        if record.hold:
            work.loaded = self.steps.warm(installed)
            return self._held_now(record, work)
        return self._step(record, Event.HEALTHY, **work.health)

    def _shadow(self, record: UpdateRecord, work: Work) -> UpdateRecord:
        self._point(record, "entered")
        work.loaded, agreement = self.steps.shadow_run(self._installed(work),
                                                       self._watching(record))
        self._point(record, "compared", last=True)
        if record.hold:
            return self._held_now(record, work)
        return self._step(record, Event.AGREED, agreement=round(agreement, 4))

    def _held_now(self, record: UpdateRecord, work: Work) -> UpdateRecord:
        record = self._step(record, Event.HOLD)
        assert work.loaded is not None
        self._held[record.model] = work.loaded
        self._report(record, StatusEvent.HELD, variant=self._installed(work).variant.id,
                     hold=True, **work.health)
        return record

    def _commit(self, record: UpdateRecord, work: Work) -> UpdateRecord:
        self._point(record, "entered")
        if work.loaded is None:  # restarted since the hold: load the kept copy again
            kept = self._kept(record)
            if kept is None:
                raise EdgeshipError("the held version is gone",
                                    reason_code=Reason.INTERRUPTED)
            work.loaded = self.steps.warm(kept)
        work.installed = work.loaded.installed
        self._point(record, "loaded", last=True)
        return self._step(record, Event.SWITCH, **work.health)

    def _trial(self, record: UpdateRecord, work: Work) -> UpdateRecord:
        self._point(record, "entered")
        if not work.switched:
            installed = self._installed(work)
            work.loaded = work.loaded or self.steps.warm(installed)
            self._point(record, "warmed")
            self.store.activate(record.model, record.version)
            self._point(record, "activated")
            self.server.swap(work.loaded, keep_previous=True)  # by version in the trial
            v = installed.variant
            self._report(record, StatusEvent.SERVING, variant=v.id, precision=v.precision)
        current, loaded = work.installed, work.loaded
        if current is None or loaded is None or current.version != record.version:
            raise EdgeshipError("the version on trial is not the one being served",
                                reason_code=Reason.INTERRUPTED)
        self.steps.watch_trial(record.model, record.version, self.superseded,
                               self._watching(record))
        self._point(record, "watched", last=True)
        return self._step(record, Event.PASSED)

    def _committed(self, record: UpdateRecord, work: Work) -> UpdateRecord:
        self.server.drop_kept(record.model)
        self.store.prune(record.model)
        self.disk.prune_partial()  # older versions' partial downloads
        self._point(record, "committed", last=True)
        return self.records.save(record.advance(Event.DONE))

    def _discard(self, record: UpdateRecord, work: Work) -> UpdateRecord:
        self._point(record, "entered")
        self._held.pop(record.model, None)
        if self.store.active_version(record.model) != record.version:
            self.disk.remove_inactive(record.model, record.version)
        logger.info("discarded held %s v%s", record.model, record.version)
        self._point(record, "removed", last=True)
        self._report(record, StatusEvent.DISCARDED)
        return self.records.save(record.advance(Event.DONE))

    def _revert(self, record: UpdateRecord, work: Work) -> UpdateRecord:
        self._point(record, "entered")
        installed = work.installed or self._kept(record)  # restarted: the kept copy again
        if installed is None:
            raise EdgeshipError("the kept version is gone", reason_code=Reason.INTERRUPTED)
        loaded = work.loaded or LoadedModel(installed, self.steps.load(installed))
        self.store.activate(record.model, record.version)
        self.server.swap(loaded)
        logger.info("reverted %s to kept v%s as desired", record.model, record.version)
        self._report(record, StatusEvent.SERVING, variant=installed.variant.id,
                     precision=installed.variant.precision, reverted=True)
        self._point(record, "switched", last=True)
        return self.records.save(record.advance(Event.DONE))

    def _rolling_back(self, record: UpdateRecord, work: Work) -> UpdateRecord:
        """Idempotent: a rollback interrupted by a crash is simply done again."""
        for attempt in range(1, ROLLBACK_ATTEMPTS + 1):
            try:
                self._point(record, f"attempt {attempt}", last=attempt == ROLLBACK_ATTEMPTS)
                self._undo(record)
                self._point(record, "undone", last=True)
                break
            except (EdgeshipError, OSError) as e:
                logger.error("rollback of %s v%s, attempt %d: %s", record.model,
                             record.version, attempt, e)
                if attempt == ROLLBACK_ATTEMPTS:
                    raise
        return self.records.save(record.advance(Event.ROLLED_BACK))

    def _failed(self, record: UpdateRecord, work: Work) -> UpdateRecord:
        if record.reason not in RESUMABLE:  # nothing to resume: no partial file stays
            self.disk.prune_partial(drop=((record.model, record.version),))
        extra = {"hold": True} if record.hold else {}
        self._report(record, StatusEvent.FAILED, reason=record.reason or Reason.INTERNAL.value,
                     detail=work.detail[:500], **extra)
        record = self.records.save(record.advance(Event.DONE))
        active = self.store.active(record.model)
        if active is not None:
            logger.info("serving %s v%s", active.model, active.version)
        return record

    # --- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _installed(work: Work) -> InstalledModel:
        if work.installed is None:
            raise EdgeshipError("no installed copy to work on", reason_code=Reason.INTERNAL)
        return work.installed

    def _kept(self, record: UpdateRecord) -> InstalledModel | None:
        """The finalized copy of the record's version, if its files still match."""
        if record.version not in self.store.versions(record.model):
            return None
        kept = self.store.load(record.model, record.version)
        return kept if self.store.verify(kept) else None

    def _undo(self, record: UpdateRecord) -> None:
        model, version = record.model, record.version
        self._held.pop(model, None)
        if self.store.active_version(model) == version:
            previous = record.previous_version
            if previous is not None and previous in self.store.versions(model):
                installed = self.store.load(model, previous)
                serving, kept = self.server.find(model), self.server.kept(model)
                loaded = None if serving is None else kept if kept is not None and \
                    kept.installed.version == previous else self.steps.warm(installed)
                self.store.activate(model, previous)
                if loaded is not None:
                    self.server.swap(loaded)
                self.report(StatusEvent.SERVING, model=model, version=previous,
                            variant=installed.variant.id, reverted_from=version)
            else:
                self.store.deactivate(model)
                self.server.remove(model)
        self.disk.remove_inactive(model, version)
        self.downloader.clean_downloads()
