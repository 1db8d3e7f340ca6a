"""The update worker: one thread, one update at a time. The dispatcher hands it release
announcements and desired states; it asks the :class:`Planner` what to do and has the
:class:`UpdateDriver` do it. The only place with locks and waits of the update side."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from edgeship.agent import protocol
from edgeship.agent.errors import (ENVIRONMENT_FAULTS, EdgeshipError, Reason,
                                   VerificationError, resource_reason)
from edgeship.agent.protocol import StatusEvent
from edgeship.agent.update.desired import DesiredTracker, Verdict
from edgeship.agent.update.driver import UpdateDriver
from edgeship.agent.update.planner import DeviceView, Do, Planner, Step
from edgeship.common.mqtt_types import Backoff

logger = logging.getLogger(__name__)


class UpdateWorker:
    """``retry_min_s``/``retry_max_s``: the jittered, doubling wait before an update that
    failed for the environment's fault (``disk_full``, ``resource_exhausted``) is tried
    again; such a failure never counts as an attempt and never blocks the version."""

    def __init__(self, driver: UpdateDriver, planner: Planner, desired: DesiredTracker,
                 stop: threading.Event, *, retry_min_s: float = 30.0,
                 retry_max_s: float = 900.0) -> None:
        self.driver = driver
        self.planner = planner
        self.desired = desired
        self._stop = stop
        self._cv = threading.Condition()
        self.retry_min_s, self.retry_max_s = retry_min_s, retry_max_s
        self._backoff: dict[tuple[str, int], Backoff] = {}
        self._due: dict[tuple[str, int], float] = {}  # retries: monotonic due time
        self._confirm_after = 0.0  # the metadata could not be refreshed: not before this
        driver.superseded = self.superseded
        driver.retry_later = self.retry_later
        if planner.known is None:
            planner.known = driver.disk.knows

    # --- any thread -------------------------------------------------------------------------

    def announced(self, ann: protocol.ReleaseAnnouncement, resent: bool = False) -> None:
        """``resent``: the fleet's catch-up re-send to this device alone; one the device has
        dealt with (serves it or newer, reverted it before) is ignored quietly."""
        if resent and self.planner.dealt_with(ann.version, self.device_view(ann.model)):
            return
        with self._cv:
            if self.planner.announced(ann, time.time(), time.monotonic()):
                self._cv.notify()

    def desired_state(self, desired: protocol.DesiredState) -> None:
        try:
            verdict = self.desired.accept(desired)
        except (VerificationError, OSError) as e:
            reason = resource_reason(e) or (e.reason_code if isinstance(e, VerificationError)
                                            else Reason.INTERNAL)
            logger.warning("refused desired %s v%s: %s", desired.model, desired.version, e)
            self.driver.report(StatusEvent.REJECTED, model=desired.model,
                               version=desired.version, reason=reason.value,
                               detail=str(e)[:300])
            return
        if verdict == Verdict.STALE:  # older than what the device follows: say so
            self.driver.report(StatusEvent.REJECTED, model=desired.model,
                               version=desired.version, reason=Reason.STALE_DESIRED.value,
                               detail=f"epoch {desired.epoch} seq {desired.seq} is older "
                               "than the desired state this device follows")
        if not verdict:  # redelivered or older: keep the newest
            return
        self.want(desired.model, desired.version, exact=True)

    def want(self, model: str, version: int, exact: bool = False) -> None:
        with self._cv:
            if self.planner.want(model, version, exact):
                self._cv.notify()

    def plan_now(self, model: str, version: int) -> list[Step]:
        """What the worker would do for ``model`` v``version`` now (``agent install FILE``
        with no agent running carries these steps out on its own thread)."""
        with self._cv:
            return self.planner.plan(model, version, self.device_view(model))

    def superseded(self, model: str, version: int) -> bool:
        with self._cv:
            return self.planner.superseded(model, version)

    def retry_later(self, model: str, version: int) -> None:
        with self._cv:
            key = (model, version)
            backoff = self._backoff.get(key)
            if backoff is None:
                if len(self._backoff) >= self.planner.max_models:
                    self._backoff.pop(next(iter(self._backoff)))
                backoff = self._backoff[key] = Backoff(self.retry_min_s, self.retry_max_s)
            delay_s = backoff.next_delay_s()
            self._due[key] = time.monotonic() + delay_s
            logger.warning("trying %s v%s again in %.0f s", model, version, delay_s)
            self._cv.notify()

    def wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    # --- the worker thread ------------------------------------------------------------------

    def run(self) -> None:
        self._safely(None, 0, self.driver.resume_pending)  # updates a restart interrupted
        while not self._stop.is_set():
            with self._cv:
                self._wait_for_work()
                if self._stop.is_set():
                    return
                taken = self.planner.take_unconfirmed() if self._may_confirm() else []
                item = None if taken else self.planner.pop()
            if taken:
                self._confirm(taken)
            elif item is not None:
                self._safely(item[0], item[1], lambda: self._update(*item))

    def _wait_for_work(self) -> None:
        """Under the lock: until something is wanted, an unknown model's announcement can
        be checked, or a retry is due (``want()``, ``retry_later`` and stop notify)."""
        while not self._stop.is_set():
            now = time.monotonic()
            for key in [k for k, due in self._due.items() if due <= now]:
                del self._due[key]
                self.planner.retry(*key)
            if self.planner.wanted or self._may_confirm():
                return
            waits = [30.0, *(due - now for due in self._due.values())]
            if self.planner.unconfirmed:
                waits.append(self._confirm_after - now)
            self._cv.wait(max(0.01, min(waits)))

    def _may_confirm(self) -> bool:
        return bool(self.planner.unconfirmed) and time.monotonic() >= self._confirm_after

    def _confirm(self, taken: list[protocol.ReleaseAnnouncement]) -> None:
        """One metadata refresh for every announced model the device does not know yet."""
        try:
            found = self.driver.downloader.confirm([(a.model, a.version) for a in taken])
        except (EdgeshipError, OSError) as e:
            logger.warning("cannot check %d announced model(s) against the signed metadata "
                           "now: %s", len(taken), e)
            with self._cv:
                self.planner.requeue(taken)
                self._confirm_after = time.monotonic() + self.retry_min_s
            return
        with self._cv:
            self.planner.confirmed(taken, found, time.time(), time.monotonic())

    def _update(self, model: str, version: int) -> None:
        with self._cv:
            delay_s = self.planner.spread_wait_s(model, time.monotonic())
        if delay_s > 0 and not self._waited(model, version, delay_s):
            return
        view = self.device_view(model)
        with self._cv:
            steps = self.planner.plan(model, version, view)
        for step in steps:
            self.do(model, step)

    def _safely(self, model: str | None, version: int, work: Callable[[], object]) -> None:
        """The update thread outlives anything one update does: an unexpected error is
        reported as ``failed``, and a full disk or exhausted descriptors are retried."""
        try:
            work()
        except Exception as e:
            reason = resource_reason(e)
            if reason is None:
                logger.exception("update of %s v%s failed", model, version)
            else:
                logger.error("update of %s v%s failed: %s", model, version, e)
            if model is None:
                return
            self.driver.report(StatusEvent.FAILED, model=model, version=version,
                               reason=(reason or Reason.INTERNAL).value, detail=str(e)[:300])
            if reason in ENVIRONMENT_FAULTS:
                self.retry_later(model, version)

    def _waited(self, model: str, version: int, delay_s: float) -> bool:
        """Wait out the announcement spread; False: skip this version (the agent stops, a
        newer version was announced, or a rollout took the model over meanwhile)."""
        logger.info("announcement spread: fetching %s v%d in %.1fs", model, version, delay_s)
        if self._stop.wait(delay_s):
            return False
        with self._cv:
            return self.planner.still_wanted(model, version)

    def device_view(self, model: str) -> DeviceView:
        d = self.driver
        record = d.records.load(model)
        known = d.disk.knows(model)
        return DeviceView(active=d.store.active_version(model), held=d.held_version(model),
                          kept=tuple(d.store.versions(model)), blocked=record.blocked,
                          known=known, models=0 if known else d.disk.model_count())

    def do(self, model: str, step: Step) -> None:
        """Carry out one planned step (on the worker thread)."""
        d = self.driver
        if step.do == Do.INSTALL:
            self._done(model, d.install(model, step.version))
        elif step.do == Do.STAGE:
            d.stage(model, step.version)
        elif step.do == Do.COMMIT:
            d.commit(model, step.version)
        elif step.do == Do.DISCARD:
            d.discard(model)
        elif step.do == Do.REVERT:
            if not d.revert(model, step.version):
                self._done(model, d.install(model, step.version))
        elif step.do == Do.REJECT:
            assert step.reason is not None
            d.report(StatusEvent.REJECTED, model=model, version=step.version,
                     reason=step.reason.value, detail=step.detail)

    def _done(self, model: str, ok: bool) -> None:
        if ok:
            with self._cv:
                for key in [k for k in self._backoff if k[0] == model]:
                    del self._backoff[key]
