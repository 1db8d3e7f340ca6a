"""The install driver: one action per state of ``agent.update.table``, run one after another
until the update rests (``idle``, or ``held`` waiting for a commit).

- Every state is persisted (``RecordStore``, fsynced) before its action runs and reported
  on the status topic (a hold reports only ``held``, ``failed``, ``discarded`` and
  ``shadow_result``).
- The health check runs in a child process with memory/CPU limits and a timeout.
- SHADOW (only when the release's manifest has a ``shadow`` policy and a version is being
  served): the candidate runs beside it on a sample of live requests.
- TRIAL: the new version is loaded and warmed, the ``current`` symlink is switched, then the
  serving reference is swapped. A rise of the error rate during the window reverts; a crash
  of the agent counts as a restart of the trial and ``trial_max_crashes`` of them revert.
- Any error rolls back from the state last persisted; after a restart, ``recover`` resumes
  or rolls back from the record; an update that keeps restarting the agent is stopped
  (``max_update_restarts``). A version reverted for a reason that is the model's fault is
  blocked for good (kept in the record).

The download side is composed in (``Downloader``), the runtime work too (``Steps``); the
action of each state is in :mod:`agent.update.actions`; an
:class:`~agent.update.observer.InstallObserver` sees each point inside each state.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from edgeship.agent.errors import ENVIRONMENT_FAULTS, EdgeshipError, Reason, resource_reason
from edgeship.agent.protocol import StatusEvent
from edgeship.agent.serving import LoadedModel, ModelServer
from edgeship.agent.store import InstalledModel, ModelStore
from edgeship.agent.update.actions import Action, StateActions, Work
from edgeship.agent.update.disk import DiskState
from edgeship.agent.update.download import Downloader, Report
from edgeship.agent.update.observer import NO_OBSERVER, InstallObserver
from edgeship.agent.update.records import RecordStore
from edgeship.agent.update.settings import InstallSettings
from edgeship.agent.update.steps import Steps, StoppingError
from edgeship.agent.update.table import (BEFORE_ACTIVATION, IN_FLIGHT, RESTING, TRANSITIONS,
                                         Event, State, UpdateRecord)

logger = logging.getLogger(__name__)

#: Reverted for one of these and the version is never tried again on this device.
MODEL_FAULTS = frozenset({
    Reason.HEALTH_CHECK_FAILED, Reason.HEALTH_CHECK_CRASHED, Reason.HEALTH_CHECK_TIMEOUT,
    Reason.HEALTH_CHECK_OUT_OF_MEMORY, Reason.NONFINITE_OUTPUT,
    Reason.OUTPUT_SHAPE_MISMATCH, Reason.GOLDEN_MISMATCH, Reason.LATENCY_BUDGET_EXCEEDED,
    Reason.TRIAL_ERROR_RATE, Reason.CRASH_LOOP, Reason.RESTART_LOOP,
    Reason.SHADOW_DISAGREEMENT, Reason.MODEL_SIGNATURE_MISMATCH})
#: States an error rolls back from.
ROLLBACK_FROM = frozenset(s for (s, e) in TRANSITIONS if e == Event.ERROR)


class UpdateDriver(StateActions):
    def __init__(self, *, store: ModelStore, records: RecordStore, server: ModelServer,
                 downloader: Downloader, steps: Steps, report: Report,
                 settings: InstallSettings, observer: InstallObserver = NO_OBSERVER,
                 superseded: Callable[[str, int], bool] | None = None,
                 retry_later: Callable[[str, int], None] | None = None) -> None:
        self.store = store
        self.records = records
        self.server = server
        self.downloader = downloader
        self.steps = steps
        self.report = report
        self.settings = settings
        self.observer = observer
        self.superseded = superseded or (lambda model, version: False)
        #: told about an update that failed for the environment's fault (try it again later)
        self.retry_later = retry_later or (lambda model, version: None)
        self.disk = DiskState(store, records, downloader, report)
        self._pending: list[tuple[UpdateRecord, Work]] = []
        self._held: dict[str, LoadedModel] = {}  # model -> the warm copy a hold staged
        self._stopping = steps.stopping
        self._actions: dict[State, Action] = {
            State.DOWNLOADING: self._downloading, State.VERIFYING: self._verifying,
            State.STAGED: self._staged, State.HEALTH_CHECK: self._health_check,
            State.SHADOW: self._shadow, State.COMMIT: self._commit, State.TRIAL: self._trial,
            State.COMMITTED: self._committed, State.DISCARD: self._discard,
            State.REVERT: self._revert, State.ROLLING_BACK: self._rolling_back,
            State.FAILED: self._failed}

    @property
    def fetcher(self) -> Any:
        return self.downloader.fetcher

    def stop(self) -> None:
        """Interrupt a shadow run or a trial window (the record stays; it resumes on start)."""
        self._stopping.set()

    # --- start-up ---------------------------------------------------------------------------

    def recover(self) -> None:
        """After a restart: clean leftovers, then resume or roll back every update that was
        in flight. Resumptions that need the network run later, in ``resume_pending``."""
        for path in self.disk.clean_leftovers():
            logger.info("removed leftover %s", path)
        self._pending = []
        for record in self.records.all():
            try:
                if record.state == State.COMMITTED:
                    self._report(record, StatusEvent.RECOVERING,
                                 from_state=record.state.value, restarts=record.restarts)
                    self.records.save(record.advance(Event.DONE))
                elif record.state in IN_FLIGHT:
                    self._recover_one(record)
            except OSError as e:  # a full disk must not keep the agent from serving
                logger.error("cannot recover the update of %s v%s now: %s (done before its "
                             "next update)", record.model, record.version, e)
                self.disk.free(record.model, record.version)

    def _recover_one(self, record: UpdateRecord) -> None:
        prior = record.state
        record = self.records.save(record.resumed())
        self._report(record, StatusEvent.RECOVERING, from_state=prior.value,
                     restarts=record.restarts)
        detail = f"agent restarted {record.restarts}x during the update (last in {prior})"
        if record.state == State.ROLLING_BACK:
            self._guarded(record, Work(detail=detail))
        elif record.state == State.TRIAL:
            if record.restarts >= self.settings.trial_max_crashes:
                self._rollback(record, Reason.CRASH_LOOP, detail)
            elif record.version not in self.store.versions(record.model):
                self._rollback(record, Reason.INTERRUPTED, "trial version is gone")
            else:
                self.store.activate(record.model, record.version)
                self._pending.append((record, Work(switched=True)))
        elif record.restarts > self.settings.max_update_restarts:
            self._rollback(record, Reason.RESTART_LOOP, detail)
        else:
            if record.state in BEFORE_ACTIVATION and prior != State.HELD:
                self.disk.remove_inactive(record.model, record.version)  # a half-done install
            self._pending.append((record, Work(detail=detail)))

    def resume_pending(self) -> None:
        """Continue what ``recover`` found in flight (called by the update worker)."""
        pending, self._pending = self._pending, []
        for record, work in pending:
            if record.state == State.TRIAL:
                work.installed = self.store.active(record.model)
                work.loaded = self.server.find(record.model)
            elif record.state == State.DOWNLOADING:
                self._report(record, StatusEvent.DOWNLOADING, resumed=True,
                             restarts=record.restarts)
            self._guarded(record, work)

    def load_active(self) -> list[InstalledModel]:
        """Serve every active model from disk: works with no network at all."""
        loaded = []
        for name in self.store.models():
            try:
                installed = self.disk.verified_active(name)
                if installed is None:
                    continue
                self.server.swap(LoadedModel(installed, self.steps.load(installed)))
                loaded.append(installed)
            except EdgeshipError as e:
                logger.error("cannot serve committed model %s: %s", name, e)
        return loaded

    # --- commands (the update worker's thread) ----------------------------------------------

    def install(self, model: str, version: int) -> bool:
        try:
            record = self._begin(model, version)
        except OSError as e:
            return self._not_saved(model, version, e, "the update record")
        self._report(record, StatusEvent.DOWNLOADING)
        return self._guarded(record, Work())

    def stage(self, model: str, version: int) -> bool:
        """All-or-none: download, verify, check and warm ``version`` without switching;
        report ``held``. Idempotent: a version already held (or served) is reported again."""
        record = self.records.load(model)
        if (record.state == State.HELD and record.version == version) or \
                self.store.active_version(model) == version:
            self.report(StatusEvent.HELD, model=model, version=version, hold=True)
            return True
        self.discard(model)
        if record.is_blocked(version):
            self.report(StatusEvent.FAILED, model=model, version=version, hold=True,
                        reason=Reason.VERSION_BLOCKED.value,
                        detail="this version was reverted on this device before")
            return False
        try:
            record = self._begin(model, version, hold=True)
        except OSError as e:
            return self._not_saved(model, version, e, "the update record", hold=True)
        return self._guarded(record, Work())

    def held_version(self, model: str) -> int | None:
        record = self.records.load(model)
        return record.version if record.state == State.HELD else None

    def commit(self, model: str, version: int) -> bool:
        """The fleet's commit of the held ``version``: switch from the warm copy."""
        record = self.records.save(self.records.load(model).advance(Event.COMMIT))
        loaded = self._held.pop(model, None)
        work = Work(loaded=loaded if loaded and loaded.installed.version == version else None,
                    health={"held": True})
        return self._guarded(record, work)

    def discard(self, model: str) -> None:
        """Drop what is held for ``model`` (nothing when nothing is held)."""
        record = self.records.load(model)
        if record.state == State.HELD:
            self._guarded(self.records.save(record.advance(Event.DISCARD)), Work())

    def revert(self, model: str, version: int) -> bool:
        """Serve the kept copy of an older ``version`` again; False when none is kept."""
        if version not in self.store.versions(model):
            return False
        try:
            installed = self.store.load(model, version)
            loaded = LoadedModel(installed, self.steps.load(installed))
        except EdgeshipError as e:
            logger.warning("kept %s v%s cannot be loaded: %s", model, version, e)
            return False
        try:
            record = self._begin(model, version, event=Event.REVERT)
        except OSError as e:
            return self._not_saved(model, version, e, "the update record")
        return self._guarded(record, Work(installed=installed, loaded=loaded))

    def _begin(self, model: str, version: int, *, hold: bool = False,
               event: Event = Event.START) -> UpdateRecord:
        self.discard(model)  # whatever else was held for this model
        record = self.records.load(model)
        if record.state in ROLLBACK_FROM or record.state == State.ROLLING_BACK:
            # a rollback a full disk kept from being saved: finish it first
            self._rollback(record, Reason(record.reason) if record.reason in set(Reason)
                           else Reason.INTERRUPTED, "finishing an earlier rollback")
            record = self.records.load(model)
        if record.state in (State.COMMITTED, State.FAILED):
            record = self.records.save(record.advance(Event.DONE))
        active = self.store.active_version(model)
        return self.records.save(record.begin(version, active, hold=hold, event=event))

    # --- the drive --------------------------------------------------------------------------

    def _guarded(self, record: UpdateRecord, work: Work) -> bool:
        """Run the actions until the update rests; any error rolls back from the state
        last persisted."""
        try:
            while record.state not in RESTING:
                record = self._actions[record.state](record, work)
            return True
        except StoppingError:
            return False
        except EdgeshipError as e:
            if record.hold and self._stopping.is_set():
                return False  # the agent is stopping: the hold stages again on start
            reason, detail = resource_reason(e) or e.reason_code, str(e)
        except Exception as e:  # a bug must not leave a half-installed model behind
            reason = resource_reason(e) or Reason.INTERNAL
            if reason == Reason.INTERNAL:
                logger.exception("unexpected error during update")
            detail = f"{type(e).__name__}: {e}"
        self._give_up(record, reason, detail)
        return False

    def _give_up(self, record: UpdateRecord, reason: Reason, detail: str) -> None:
        """Roll back and report ``failed``. For the environment's fault (a full disk, no
        descriptors left): free the update's files first (the rollback needs room to save
        the record), never block the version, and have the update tried again later."""
        if reason in ENVIRONMENT_FAULTS:
            self.disk.free(record.model, record.version)
        try:
            self._rollback(self.records.load(record.model), reason, detail)
        except Exception as e:
            self._not_saved(record.model, record.version, e, f"{detail[:300]}; the rollback",
                            record.hold, reason)
            return
        if reason in ENVIRONMENT_FAULTS:
            self.retry_later(record.model, record.version)

    def _not_saved(self, model: str, version: int, error: Exception, what: str,
                   hold: bool = False, reason: Reason = Reason.INSTALL_FAILED) -> bool:
        """``what`` could not be saved (a full disk): free the version's files, report
        ``failed``; an unsaved rollback is finished before the model's next update."""
        reason = resource_reason(error) or reason
        if reason not in ENVIRONMENT_FAULTS:
            logger.exception("update of %s v%s: %s not saved", model, version, what)
        self.disk.free(model, version)
        self.report(StatusEvent.FAILED, model=model, version=version, reason=reason.value,
                    detail=f"{what} not saved: {error}"[:500], **({"hold": True} if hold
                                                                 else {}))
        if reason in ENVIRONMENT_FAULTS:
            self.retry_later(model, version)
        return False

    def _rollback(self, record: UpdateRecord, reason: Reason, detail: str) -> None:
        logger.warning("update %s v%s failed (%s): %s", record.model, record.version,
                       reason, detail)
        if record.state != State.ROLLING_BACK:
            if record.state not in ROLLBACK_FROM:  # committed already: nothing to undo
                return
            record = self.records.save(record.advance(Event.ERROR, reason=reason.value))
        if reason in MODEL_FAULTS:
            record = self.records.save(record.block(record.version))
        self._report(record, StatusEvent.ROLLING_BACK, reason=reason.value)
        work = Work(detail=detail)
        while record.state not in RESTING:
            record = self._actions[record.state](record, work)
