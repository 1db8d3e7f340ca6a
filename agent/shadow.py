"""Shadow testing of a candidate version beside the one being served (issue 4).

The serving path only *offers* a sample of live requests (inputs and the served outputs) to
a bounded queue and never waits; a worker thread runs the candidate on them and counts
top-1 agreement per sample. A full queue drops the sample (counted), so the candidate can
never slow down or fail a live request.

When the run ends the agent reports :meth:`ShadowRun.summary` in a ``shadow_result`` status
event (pass or fail); the fleet's rollout shadow gate reads that field and nothing else.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from typing import Any

import numpy as np

from edgeship.agent.manifest import ShadowPolicy
from edgeship.agent.serving import LoadedModel

logger = logging.getLogger(__name__)

QUEUE_MAX = 64


class ShadowRun:
    def __init__(self, candidate: LoadedModel, policy: ShadowPolicy,
                 rng: random.Random | None = None) -> None:
        self.candidate = candidate
        self.policy = policy
        self._rng = rng or random.Random()
        self._queue: queue.Queue[tuple[dict[str, np.ndarray], np.ndarray] | None] = \
            queue.Queue(maxsize=QUEUE_MAX)
        self._lock = threading.Lock()
        self.compared = 0
        self.agreed = 0
        self.errors = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._work, name="edgeship-shadow",
                                        daemon=True)
        self._thread.start()

    @property
    def agreement(self) -> float:
        with self._lock:
            return self.agreed / self.compared if self.compared else 0.0

    def summary(self) -> dict[str, Any]:
        """What the device reports at the end of the shadow run (status event
        ``shadow_result``, field ``shadow``); the fleet's shadow gate reads exactly this."""
        with self._lock:
            compared, agreed = self.compared, self.agreed
        return {"agreement": round(agreed / compared, 4) if compared else None,
                "compared": compared, "agreed": agreed, "errors": self.errors,
                "dropped": self.dropped, "samples": self.policy.samples,
                "min_agreement": self.policy.min_agreement}

    def offer(self, inputs: dict[str, np.ndarray], outputs: list[Any]) -> None:
        """Called on the serving path after the reply is computed: never blocks."""
        if self._rng.random() >= self.policy.sample_rate:
            return
        try:
            self._queue.put_nowait((inputs, np.asarray(outputs[0])))
        except queue.Full:
            self.dropped += 1

    def close(self) -> None:
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout=5)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            inputs, served = item
            try:
                got = np.asarray(self.candidate.runtime.run(inputs)[0])
                same = _top1(got) == _top1(served)
            except Exception as e:  # the candidate failing counts against it
                logger.info("shadow candidate failed on a live request: %s", e)
                same = np.zeros(len(served) if served.ndim else 1, dtype=bool)
                self.errors += 1
            with self._lock:
                self.compared += int(same.size)
                self.agreed += int(np.count_nonzero(same))


def _top1(outputs: np.ndarray) -> np.ndarray:
    flat = outputs.reshape(outputs.shape[0], -1) if outputs.ndim > 1 else outputs[None, :]
    return np.argmax(flat, axis=1)
