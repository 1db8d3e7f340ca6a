"""Telemetry: per-model and per-device numbers, batched; a bounded spool while offline."""

from __future__ import annotations

import os
import resource
import shutil
import time
from collections import deque
from pathlib import Path
from typing import Any

from agent.serving import ModelServer


def read_temperature_c() -> float | None:
    """Highest reading of /sys/class/thermal zones (Pi and Jetson both expose these)."""
    temps = []
    for zone in Path("/sys/class/thermal").glob("thermal_zone*/temp"):
        try:
            temps.append(int(zone.read_text().strip()) / 1000.0)
        except (OSError, ValueError):
            continue
    return max(temps) if temps else None


def device_metrics(state_dir: Path) -> dict[str, Any]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu_s": usage.ru_utime + usage.ru_stime, "max_rss_mb": usage.ru_maxrss / 1024,
            "load1": load1, "temperature_c": read_temperature_c(),
            "disk_free_mb": shutil.disk_usage(state_dir).free / 2**20}


def build_batch(device: str, server: ModelServer, state_dir: Path,
                extra: dict[str, Any]) -> dict[str, Any]:
    models = {}
    for loaded in server.models():
        name = loaded.installed.model
        snap = server.stats[name].snapshot(reset=True)
        models[name] = {"version": loaded.installed.version,
                        "variant": loaded.installed.variant.id, **snap}
    return {"device": device, "ts": time.time(), "models": models,
            "system": device_metrics(state_dir), **extra}


class Spool:
    """Batches not yet acknowledged by the broker; oldest evicted (and counted) when full."""

    def __init__(self, max_batches: int = 1000) -> None:
        self._items: deque[bytes] = deque()
        self.max_batches = max_batches
        self.evicted = 0

    def push(self, payload: bytes) -> None:
        if len(self._items) >= self.max_batches:
            self._items.popleft()
            self.evicted += 1
        self._items.append(payload)

    def peek(self) -> bytes | None:
        return self._items[0] if self._items else None

    def pop(self) -> None:
        self._items.popleft()

    def __len__(self) -> int:
        return len(self._items)
