"""What the tests (and the benchmarks under ``bench/``) share: brokers and fleets on loopback,
agent processes, test models and bundles, and one way to wait for a condition."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(pred: Callable[[], T], timeout_s: float = 60.0, what: str = "condition",
               tick_s: float = 0.05) -> T:
    """Poll ``pred`` until it returns something truthy and return that; AssertionError
    naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(tick_s)
