"""Helpers for fleet-control tests: inference traffic on in-process agents, polling."""

from __future__ import annotations

import threading

from edgeship.agent.errors import EdgeshipError

WIDTH = 256  # synthetic model width for the fleet-control tests


class Traffic:
    """Calls each agent's model in-process (the way its local API would) until stopped."""

    def __init__(self, agents, model: str, x) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(agents, model, x),
                                        daemon=True)
        self._thread.start()

    def _run(self, agents, model, x) -> None:
        while not self._stop.wait(0.01):
            for agent in agents:
                try:
                    agent.server.predict(model, x)
                except EdgeshipError:
                    pass  # not serving yet

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

