"""The update worker: one thread, one update at a time. The dispatcher hands it release
announcements and desired states; it asks the :class:`Planner` what to do and has the
:class:`UpdateDriver` do it. The only place with locks and waits of the update side."""

from __future__ import annotations

import logging
import threading
import time

from edgeship.agent import protocol
from edgeship.agent.protocol import StatusEvent
from edgeship.agent.update.desired import DesiredTracker
from edgeship.agent.update.driver import UpdateDriver
from edgeship.agent.update.planner import DeviceView, Do, Planner, Step

logger = logging.getLogger(__name__)


class UpdateWorker:
    def __init__(self, driver: UpdateDriver, planner: Planner, desired: DesiredTracker,
                 stop: threading.Event) -> None:
        self.driver = driver
        self.planner = planner
        self.desired = desired
        self._stop = stop
        self._cv = threading.Condition()
        driver.superseded = self.superseded

    # --- any thread -------------------------------------------------------------------------

    def announced(self, ann: protocol.ReleaseAnnouncement) -> None:
        with self._cv:
            if self.planner.announced(ann, time.time(), time.monotonic()):
                self._cv.notify()

    def desired_state(self, desired: protocol.DesiredState) -> None:
        if not self.desired.accept(desired):  # redelivered or older: keep the newest
            logger.info("ignoring desired %s v%s (seq %s): not newer", desired.model,
                        desired.version, desired.seq)
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

    def wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    # --- the worker thread ------------------------------------------------------------------

    def run(self) -> None:
        self.driver.resume_pending()  # finish updates a restart interrupted
        while not self._stop.is_set():
            with self._cv:
                while not self.planner.wanted and not self._stop.is_set():
                    self._cv.wait(30.0)  # want() and stop notify; a safety net only
                if self._stop.is_set():
                    return
                item = self.planner.pop()
                assert item is not None
                model, version = item
                delay_s = self.planner.spread_wait_s(model, time.monotonic())
            if delay_s > 0 and not self._waited(model, version, delay_s):
                continue
            with self._cv:
                steps = self.planner.plan(model, version, self.device_view(model))
            for step in steps:
                self.do(model, step)

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
        return DeviceView(active=d.store.active_version(model), held=d.held_version(model),
                          kept=tuple(d.store.versions(model)), blocked=record.blocked)

    def do(self, model: str, step: Step) -> None:
        """Carry out one planned step (on the worker thread)."""
        d = self.driver
        if step.do == Do.INSTALL:
            d.install(model, step.version)
        elif step.do == Do.STAGE:
            d.stage(model, step.version)
        elif step.do == Do.COMMIT:
            d.commit(model, step.version)
        elif step.do == Do.DISCARD:
            d.discard(model)
        elif step.do == Do.REVERT:
            if not d.revert(model, step.version):
                d.install(model, step.version)
        elif step.do == Do.REJECT:
            assert step.reason is not None
            d.report(StatusEvent.REJECTED, model=model, version=step.version,
                     reason=step.reason.value, detail=step.detail)
