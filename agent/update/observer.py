"""What the install driver tells an observer: each point it passes inside each state.

The product passes no observer (:data:`NO_OBSERVER`, does nothing). Tests plug in their own
(``tests/install/faults.py`` kills the process or raises at these points), so nothing of a
fault plan ships to a device and no setting or environment variable reaches one.
"""

from __future__ import annotations

from typing import Protocol

from edgeship.agent.update.table import State


class InstallObserver(Protocol):
    def point(self, state: State, version: int, label: str, *, last: bool = False) -> None:
        """The driver is at ``label`` inside ``state`` of the update to ``version``;
        ``last``: the last point of that state before the record moves on. An exception
        raised here fails the update like any error of the step."""


class _NoObserver:
    def point(self, state: State, version: int, label: str, *, last: bool = False) -> None:
        return None


NO_OBSERVER: InstallObserver = _NoObserver()
