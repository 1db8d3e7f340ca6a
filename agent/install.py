"""Safe install: the lifecycle driver behind ``UpdateManager`` (download side excluded).

    downloading → verifying → staged → health_check [→ shadow] → trial → committed
                                   any error → rolling_back → failed

- Every state is persisted (``RecordStore``, fsynced) before its side effects and reported
  on the status topic.
- The health check runs in a child process with memory/CPU limits and a timeout
  (``agent.health.check_in_subprocess``).
- SHADOW (only when the release's manifest has a ``shadow`` policy and a version is being
  served): the candidate runs beside it on a sample of live requests (``agent.shadow``);
  below the release's top-1 agreement threshold it is reverted before it ever serves.
- TRIAL: the new version is loaded and warmed in this process, the ``current`` symlink is
  switched, then the serving reference is swapped (requests in flight finish on the old
  runtime). During the trial window a rise of the error rate reverts; a crash of the agent
  counts as a restart of the trial and ``trial_max_crashes`` of them revert (crash loop).
- After a restart, ``recover`` resumes or rolls back from the record; an update that keeps
  restarting the agent is stopped (``max_update_restarts``). A version reverted for a
  reason that is the model's fault is blocked for good (kept in the record).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from edgeship.agent.errors import EdgeshipError, Reason
from edgeship.agent.budget import LatencyBudget, latency_budget
from edgeship.agent.health import HealthLimits, check_health, check_in_subprocess, golden_for
from edgeship.agent.lifecycle import IN_FLIGHT, Event, State, UpdateRecord
from edgeship.agent.serving import LoadedModel
from edgeship.agent.store import InstalledModel

if TYPE_CHECKING:
    from edgeship.agent.updater import UpdateManager

logger = logging.getLogger(__name__)

ROLLBACK_ATTEMPTS = 3

#: Reverted for one of these and the version is never tried again on this device.
MODEL_FAULTS = frozenset({
    Reason.HEALTH_CHECK_FAILED, Reason.HEALTH_CHECK_CRASHED, Reason.HEALTH_CHECK_TIMEOUT,
    Reason.HEALTH_CHECK_OUT_OF_MEMORY, Reason.NONFINITE_OUTPUT,
    Reason.OUTPUT_SHAPE_MISMATCH, Reason.GOLDEN_MISMATCH, Reason.LATENCY_BUDGET_EXCEEDED,
    Reason.TRIAL_ERROR_RATE, Reason.CRASH_LOOP, Reason.RESTART_LOOP,
    Reason.SHADOW_DISAGREEMENT,
    Reason.FAULT_INJECTED})  # the tests' stand-in for "this update broke"


@dataclass(frozen=True)
class InstallSettings:
    trial_window_s: float = 30.0
    trial_min_requests: int = 20  # fewer requests than this in the window: rate not judged
    trial_max_error_rate: float = 0.05
    trial_max_crashes: int = 2  # agent restarts during one trial before it is reverted
    max_update_restarts: int = 3  # restarts before commit before the update is stopped
    health: HealthLimits = field(default_factory=HealthLimits)
    health_in_subprocess: bool = True


class TrialFailedError(EdgeshipError):
    reason_code = Reason.TRIAL_ERROR_RATE


class InstallLifecycle:
    """Mixed into ``UpdateManager``, which provides the download side (``download``,
    ``verify_staged``, ``clean_downloads``) and the attributes used here.

    The steps ``download`` → ``verify_staged`` → ``health_check`` → ``warm`` / ``shadow_run``
    and ``remove_inactive`` are public: :class:`agent.desired.HeldVersions` runs the same
    steps to stage a version without switching (all-or-none rollouts)."""

    settings: InstallSettings
    superseded: Callable[[str, int], bool]
    _pending: list[UpdateRecord]
    _stopping: threading.Event

    # --- start-up ---------------------------------------------------------------------------

    def recover(self: "UpdateManager") -> None:
        """After a restart: clean leftovers, then resume or roll back every update that was
        in flight. Resumptions that need the network run later, in ``resume_pending``."""
        for path in self.store.clean_leftovers() + self.records.clean_temp():
            logger.info("removed leftover %s", path)
        self.clean_downloads()
        self._pending = []
        for record in self.records.all():
            if record.state == State.COMMITTED:
                self.report("recovering", model=record.model, version=record.version,
                            from_state=record.state.value, restarts=record.restarts)
                self._save(record.advance(Event.DONE))
            elif record.state in IN_FLIGHT:
                self._recover_one(record)

    def _recover_one(self: "UpdateManager", record: UpdateRecord) -> None:
        prior = record.state
        record = self._save(record.resumed())
        self.report("recovering", model=record.model, version=record.version,
                    from_state=prior.value, restarts=record.restarts)
        detail = f"agent restarted {record.restarts}x during the update (last in {prior})"
        if record.state == State.ROLLING_BACK:
            self._finish_rollback(record, detail)
        elif record.state == State.TRIAL:
            if record.restarts >= self.settings.trial_max_crashes:
                self._rollback(record, Reason.CRASH_LOOP, detail)
            elif not self._reactivate(record):
                self._rollback(record, Reason.INTERRUPTED, "trial version is gone")
            else:
                self._pending.append(record)
        elif record.restarts > self.settings.max_update_restarts:
            self._rollback(record, Reason.RESTART_LOOP, detail)
        else:
            self.remove_inactive(record.model, record.version)
            self._pending.append(record)

    def _reactivate(self: "UpdateManager", record: UpdateRecord) -> bool:
        if record.version not in self.store.versions(record.model):
            return False
        self.store.activate(record.model, record.version)
        return True

    def resume_pending(self: "UpdateManager") -> None:
        """Continue what ``recover`` found in flight (called by the update worker)."""
        pending, self._pending = self._pending, []
        for record in pending:
            if record.state == State.TRIAL:
                installed = self.store.active(record.model)
                loaded = self.server.find(record.model)
                self._guarded(record, lambda r: self._finish_trial(r, installed, loaded))
            else:
                self.report("downloading", model=record.model, version=record.version,
                            resumed=True, restarts=record.restarts)
                self._guarded(record, self._run)

    def load_active(self: "UpdateManager") -> list[InstalledModel]:
        """Serve every active model from disk: works with no network at all."""
        loaded = []
        for name in self.store.models():
            try:
                installed = self._verified_active(name)
                if installed is None:
                    continue
                self.server.swap(LoadedModel(installed, self._load(installed)))
                loaded.append(installed)
            except EdgeshipError as e:
                logger.error("cannot serve committed model %s: %s", name, e)
        return loaded

    def _verified_active(self: "UpdateManager", model: str) -> InstalledModel | None:
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
                self.report("serving", model=model, version=version,
                            variant=candidate.variant.id, reason=Reason.HASH_MISMATCH.value,
                            detail=f"v{active.version} is damaged on disk")
                return candidate
        return None

    # --- one update -------------------------------------------------------------------------

    def handle_announcement(self: "UpdateManager", model: str, version: int) -> None:
        active = self.store.active(model)
        if active is not None and version <= active.version:
            if version < active.version:
                self.report("rejected", model=model, version=version,
                            reason=Reason.STALE_ANNOUNCEMENT.value,
                            detail=f"v{active.version} is installed")
            return
        if self.records.load(model).is_blocked(version):
            self.report("rejected", model=model, version=version,
                        reason=Reason.VERSION_BLOCKED.value,
                        detail="this version was reverted on this device before")
            return
        attempts = self._attempts.get((model, version), 0)
        if attempts >= self.max_attempts_per_version:
            logger.info("not retrying %s v%s after %d attempts", model, version, attempts)
            return
        self._attempts[(model, version)] = attempts + 1
        self.install(model, version)

    def install(self: "UpdateManager", model: str, version: int,
                held: LoadedModel | None = None) -> bool:
        """``held``: the warm copy an all-or-none hold staged and health-checked
        (``agent.desired.HeldVersions``); the commit then only switches."""
        record = self.records.load(model)
        if record.state in (State.COMMITTED, State.FAILED):
            record = self._save(record.advance(Event.DONE))
        active = self.store.active(model)
        record = self._save(record.begin(version, active.version if active else None))
        if held is not None and held.installed.version == version:
            return self._guarded(record, lambda r: self._commit_held(r, held))
        self.report("downloading", model=model, version=version)
        return self._guarded(record, self._run)

    def _commit_held(self: "UpdateManager", record: UpdateRecord,
                     held: LoadedModel) -> UpdateRecord:
        """Record the steps the hold already went through, then shadow/trial as usual."""
        for event in (Event.DOWNLOADED, Event.VERIFIED, Event.CHECK):
            record = self._save(record.advance(event))
        return self._checked(record, held.installed, {"held": True}, held)

    def _guarded(self: "UpdateManager", record: UpdateRecord,
                 body: Callable[[UpdateRecord], UpdateRecord]) -> bool:
        """Run ``body``; any error rolls back from the state last persisted."""
        try:
            body(record)
            return True
        except _Stopping:
            return False
        except EdgeshipError as e:
            self._rollback(self.records.load(record.model), e.reason_code, str(e))
        except Exception as e:  # a bug must not leave a half-installed model behind
            logger.exception("unexpected error during update")
            self._rollback(self.records.load(record.model), Reason.INTERNAL,
                           f"{type(e).__name__}: {e}")
        return False

    def _run(self: "UpdateManager", record: UpdateRecord) -> UpdateRecord:
        model, version = record.model, record.version
        staging = self.store.staging_dir(model, version)
        self._fault(record, "started")
        manifest, variant_id = self.download(model, version, staging)
        self._fault(record, "downloaded", last=True)
        record = self._step(record, Event.DOWNLOADED)
        self._fault(record, "entered")
        variant = self.verify_staged(manifest, variant_id, staging)
        self._fault(record, "verified", last=True)
        record = self._step(record, Event.VERIFIED)
        self._fault(record, "entered")
        installed = self.store.finalize(model, version, staging, manifest, variant)
        self._fault(record, "finalized", last=True)
        record = self._step(record, Event.CHECK)
        self._fault(record, "entered")
        report = self.health_check(installed)
        self._fault(record, "checked", last=True)
        health = {"max_abs_diff": report.max_abs_diff,
                  "latency_ms": round(report.latency_ms, 3)}
        return self._checked(record, installed, health)

    def _checked(self: "UpdateManager", record: UpdateRecord, installed: InstalledModel,
                 health: dict, loaded: LoadedModel | None = None) -> UpdateRecord:
        """Healthy: through the shadow run (when the release asks for one) to the trial.
        A ``loaded`` copy comes from an all-or-none hold, which ran the shadow already."""
        if installed.manifest.shadow is not None and loaded is None and \
                self.server.find(record.model) is not None:
            record = self._step(record, Event.SHADOW, **health)
            loaded, agreement = self.shadow_run(record, installed)
            record = self._step(record, Event.AGREED, agreement=round(agreement, 4))
            return self._trial(record, installed, loaded)
        record = self._step(record, Event.HEALTHY, **health)
        return self._trial(record, installed, loaded)

    def shadow_run(self: "UpdateManager", record: UpdateRecord,
                installed: InstalledModel) -> tuple[LoadedModel, float]:
        """Run the candidate beside the served version on a sample of live requests."""
        from edgeship.agent.shadow import ShadowRun

        policy = installed.manifest.shadow
        assert policy is not None
        self._fault(record, "entered")
        loaded = self.warm(installed)
        run = ShadowRun(loaded, policy)
        self.server.shadows[record.model] = run
        try:
            deadline = time.monotonic() + policy.timeout_s
            while run.compared < policy.samples and time.monotonic() < deadline:
                if self._stopping.wait(0.05):
                    raise _Stopping("the agent is stopping")
                self._fault(record, "watching")
        finally:
            self.server.shadows.pop(record.model, None)
            run.close()
        self.report("shadow_result", model=record.model, version=record.version,
                    shadow=run.summary())  # issue 6: the fleet's shadow gate reads this
        self._fault(record, "compared", last=True)
        if run.compared < policy.samples:
            raise EdgeshipError(f"only {run.compared} of {policy.samples} shadow samples in "
                                f"{policy.timeout_s:g} s", reason_code=Reason.SHADOW_DISAGREEMENT)
        if run.agreement < policy.min_agreement:
            raise EdgeshipError(f"top-1 agreement {run.agreement:.3f} with the served version "
                                f"is below {policy.min_agreement:g} ({run.compared} samples)",
                                reason_code=Reason.SHADOW_DISAGREEMENT)
        logger.info("%s v%s agrees with the served version on %.1f%% of %d samples",
                    record.model, record.version, 100 * run.agreement, run.compared)
        return loaded, run.agreement

    def _step(self: "UpdateManager", record: UpdateRecord, event: Event,
              **extra: object) -> UpdateRecord:
        new = self._save(record.advance(event))
        if new.state not in (State.IDLE, State.DOWNLOADING):
            self.report(new.state.value, model=new.model, version=new.version, **extra)
        return new

    def _save(self: "UpdateManager", record: UpdateRecord) -> UpdateRecord:
        self.records.save(record)
        return record

    def _fault(self: "UpdateManager", record: UpdateRecord, label: str,
               last: bool = False) -> None:
        self.faults.point(record.state.value, record.version, label, last=last)

    # --- health check, trial, commit ----------------------------------------------------------

    def latency_budget(self: "UpdateManager", installed: InstalledModel) -> LatencyBudget:
        """The release's budget, else one derived from the converter's measurement, else
        the profile's default (``agent.budget``)."""
        t = self.traits
        return latency_budget(installed.manifest, installed.variant, t.latency_budget_ms,
                              t.latency_scale)

    def health_check(self: "UpdateManager", installed: InstalledModel):
        t = self.traits
        budget = self.latency_budget(installed)
        if self.settings.health_in_subprocess:
            limits = self.settings.health
            limits = HealthLimits(timeout_s=limits.timeout_s,
                                  max_memory_mb=limits.max_memory_mb, threads=t.threads,
                                  providers=t.providers, latency_budget_ms=budget.ms,
                                  budget_source=budget.source)
            report = check_in_subprocess(installed.directory, installed.variant.id, limits)
        else:
            report = check_health(self._load(installed), installed.manifest,
                                  installed.variant, installed.golden_path,
                                  latency_budget_ms=budget.ms, budget_source=budget.source)
        logger.info("%s v%s healthy: max_abs_diff=%.3g latency=%.2f ms", installed.model,
                    installed.version, report.max_abs_diff, report.latency_ms)
        return report

    def warm(self: "UpdateManager", installed: InstalledModel) -> LoadedModel:
        """Load the runtime in this process and run the golden samples once, off the
        serving path, so the first live request does not pay for initialisation."""
        runtime = self._load(installed)
        golden = golden_for(installed.manifest, installed.variant, installed.golden_path)
        try:
            for feed in golden.feeds:
                runtime.run(feed)
        except Exception as e:
            raise EdgeshipError(f"warm-up failed: {e}",
                                reason_code=Reason.HEALTH_CHECK_FAILED) from e
        return LoadedModel(installed, runtime)

    def _trial(self: "UpdateManager", record: UpdateRecord, installed: InstalledModel,
               loaded: LoadedModel | None = None) -> UpdateRecord:
        self._fault(record, "entered")
        loaded = loaded or self.warm(installed)
        self._fault(record, "warmed")
        self.store.activate(record.model, record.version)
        self._fault(record, "activated")
        self.server.swap(loaded)
        v = installed.variant
        self.report("serving", model=record.model, version=record.version, variant=v.id,
                    precision=v.precision)
        return self._finish_trial(record, installed, loaded)

    def _finish_trial(self: "UpdateManager", record: UpdateRecord,
                      installed: InstalledModel | None,
                      loaded: LoadedModel | None) -> UpdateRecord:
        if installed is None or loaded is None or installed.version != record.version:
            raise EdgeshipError("the version on trial is not the one being served",
                                reason_code=Reason.INTERRUPTED)
        self._watch_trial(record)
        self._fault(record, "watched", last=True)
        record = self._step(record, Event.PASSED)
        self.store.prune(record.model)
        self._fault(record, "committed", last=True)
        return self._save(record.advance(Event.DONE))

    def _watch_trial(self: "UpdateManager", record: UpdateRecord) -> None:
        s = self.settings
        stats = self.server.stats_for(record.model)
        req0, err0 = stats.total_requests, stats.total_model_errors
        deadline = time.monotonic() + s.trial_window_s
        tick_s = max(0.01, min(0.2, s.trial_window_s / 10))
        while time.monotonic() < deadline:
            if self._stopping.wait(tick_s):
                raise _Stopping("the agent is stopping")
            self._fault(record, "watching")
            requests, errors = stats.total_requests - req0, stats.total_model_errors - err0
            if requests >= s.trial_min_requests and errors / requests > s.trial_max_error_rate:
                raise TrialFailedError(f"{errors} of {requests} requests failed during the "
                                       f"trial (max rate {s.trial_max_error_rate:g})")
            if self.superseded(record.model, record.version):
                logger.info("trial of %s v%s cut short by a newer release", record.model,
                            record.version)
                return

    # --- rollback ---------------------------------------------------------------------------

    def _rollback(self: "UpdateManager", record: UpdateRecord, reason: Reason,
                  detail: str) -> None:
        logger.warning("update %s v%s failed (%s): %s", record.model, record.version,
                       reason, detail)
        if record.state not in IN_FLIGHT:  # committed already: nothing left to undo
            return
        if record.state != State.ROLLING_BACK:
            record = self._save(record.advance(Event.ERROR, reason=reason.value))
        if reason in MODEL_FAULTS:
            record = self._save(record.block(record.version))
        self.report("rolling_back", model=record.model, version=record.version,
                    reason=reason.value)
        self._finish_rollback(record, detail)

    def _finish_rollback(self: "UpdateManager", record: UpdateRecord, detail: str) -> None:
        """Idempotent: a rollback interrupted by a crash is simply done again."""
        for attempt in range(1, ROLLBACK_ATTEMPTS + 1):
            try:
                self._fault(record, f"attempt {attempt}", last=attempt == ROLLBACK_ATTEMPTS)
                self._undo(record)
                self._fault(record, "undone", last=True)
                break
            except (EdgeshipError, OSError) as e:
                logger.error("rollback of %s v%s, attempt %d: %s", record.model,
                             record.version, attempt, e)
                if attempt == ROLLBACK_ATTEMPTS:
                    raise
        record = self._save(record.advance(Event.ROLLED_BACK))
        self.report("failed", model=record.model, version=record.version,
                    reason=record.reason or Reason.INTERNAL.value, detail=detail[:500])
        self._save(record.advance(Event.DONE))
        active = self.store.active(record.model)
        if active is not None:
            logger.info("serving %s v%s", active.model, active.version)

    def _undo(self: "UpdateManager", record: UpdateRecord) -> None:
        model, version = record.model, record.version
        active = self.store.active_version(model)
        if active == version:
            previous = record.previous_version
            if previous is not None and previous in self.store.versions(model):
                installed = self.store.load(model, previous)
                serving = self.server.find(model)
                loaded = self.warm(installed) if serving is not None else None
                self.store.activate(model, previous)
                if loaded is not None:
                    self.server.swap(loaded)
                self.report("serving", model=model, version=previous,
                            variant=installed.variant.id, reverted_from=version)
            else:
                self.store.deactivate(model)
                self.server.remove(model)
        self.remove_inactive(model, version)
        self.clean_downloads()

    def remove_inactive(self: "UpdateManager", model: str, version: int) -> None:
        if self.store.active_version(model) != version:
            self.store.remove_version(model, version)
        shutil.rmtree(self.store.root / model / f".staging-{version}", ignore_errors=True)


class _Stopping(EdgeshipError):
    """The agent is shutting down mid-trial: leave the record as it is (TRIAL)."""
