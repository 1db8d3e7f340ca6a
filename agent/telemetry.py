"""Telemetry: per-model and per-device numbers, batched; forwarded from the on-disk spool.

Parsing of ``/proc`` and ``/sys`` text is pure (``parse_*``); reading the files happens in
:class:`DeviceSampler`. :class:`TelemetryForwarder` drains :class:`agent.spool.TelemetrySpool`
through anything with ``connected`` and ``publish_acked`` (an ``MqttSession``), deleting a
record only after a success PUBACK.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from edgeship.agent import protocol
from edgeship.agent.errors import TransferError
from edgeship.agent.llm.stats import lm_window
from edgeship.agent.serving import ModelServer
from edgeship.agent.spool import SpoolSettings, TelemetrySpool

logger = logging.getLogger(__name__)

THERMAL_ROOT = Path("/sys/class/thermal")
#: Older Jetson kernels (L4T 32) also list zones here, with types like "CPU-therm".
JETSON_THERMAL_ROOT = Path("/sys/devices/virtual/thermal")
MAX_ZONES = 32


# --- pure parsers -------------------------------------------------------------------------

def parse_meminfo(text: str) -> dict[str, float]:
    """``/proc/meminfo`` → total and available MB."""
    kb = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            kb[key.strip()] = int(parts[0])
    total = kb.get("MemTotal", 0) / 1024
    avail = kb.get("MemAvailable", kb.get("MemFree", 0)) / 1024
    return {"total_mb": total, "available_mb": avail,
            "used_percent": 100.0 * (1 - avail / total) if total else 0.0}


def parse_cpu_times(text: str) -> tuple[int, int]:
    """First line of ``/proc/stat`` → (busy, total) jiffies."""
    fields = text.splitlines()[0].split()
    if not fields or fields[0] != "cpu":
        raise ValueError("not a /proc/stat 'cpu' line")
    values = [int(v) for v in fields[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already inside user/nice
    return total - idle, total


def cpu_percent(prev: tuple[int, int], cur: tuple[int, int]) -> float | None:
    busy, total = cur[0] - prev[0], cur[1] - prev[1]
    return 100.0 * busy / total if total > 0 else None


def parse_temperature_c(text: str) -> float | None:
    """A thermal zone's ``temp`` file: millidegrees (most boards) or degrees."""
    try:
        value = int(text.strip())
    except ValueError:
        return None
    return value / 1000.0 if abs(value) > 200 else float(value)


# --- I/O: sampling the device --------------------------------------------------------------

def read_thermal_zones(roots: tuple[Path, ...] = (THERMAL_ROOT, JETSON_THERMAL_ROOT)
                       ) -> dict[str, float]:
    """Zone type → °C for every readable thermal zone (Pi: ``cpu-thermal``; Jetson:
    ``CPU-therm``, ``GPU-therm``, ``SOC0-therm``…), deduplicated across roots."""
    zones: dict[str, float] = {}
    seen: set[str] = set()
    for root in roots:
        for zone in sorted(root.glob("thermal_zone*"))[:MAX_ZONES]:
            try:
                real = str(zone.resolve())
                if real in seen:
                    continue
                seen.add(real)
                kind = (zone / "type").read_text().strip() or zone.name
                temp = parse_temperature_c((zone / "temp").read_text())
            except OSError:
                continue
            if temp is not None:
                zones[kind if kind not in zones else f"{kind}-{zone.name}"] = temp
    return zones


def read_temperature_c() -> float | None:
    """Highest reading of all thermal zones."""
    zones = read_thermal_zones()
    return max(zones.values()) if zones else None


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


class DeviceSampler:
    """Per-device numbers; CPU is the system-wide share since the previous sample."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._prev_cpu = self._cpu_times()
        self._prev_proc = self._proc_cpu_s()
        self._prev_t = time.monotonic()

    @staticmethod
    def _cpu_times() -> tuple[int, int] | None:
        text = _read("/proc/stat")
        try:
            return parse_cpu_times(text) if text else None
        except (ValueError, IndexError):
            return None

    @staticmethod
    def _proc_cpu_s() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def sample(self) -> dict[str, Any]:
        cur, proc, now = self._cpu_times(), self._proc_cpu_s(), time.monotonic()
        system_cpu = cpu_percent(self._prev_cpu, cur) if cur and self._prev_cpu else None
        agent_cpu = 100.0 * (proc - self._prev_proc) / max(1e-6, now - self._prev_t)
        self._prev_cpu, self._prev_proc, self._prev_t = cur, proc, now
        mem = parse_meminfo(_read("/proc/meminfo") or "")
        zones = read_thermal_zones()
        return {"cpu_percent": system_cpu, "agent_cpu_percent": agent_cpu,
                "cpu_s": proc, "rss_mb": rss_mb(), "memory": mem,
                "load1": os.getloadavg()[0], "temperature_c": max(zones.values())
                if zones else None, "thermal_zones": zones,
                "disk_free_mb": shutil.disk_usage(self.state_dir).free / 2**20}


def rss_mb() -> float:
    text = _read("/proc/self/statm")
    if text:
        return int(text.split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- batches -----------------------------------------------------------------------------

def build_batch(device: str, server: ModelServer, system: dict[str, Any],
                extra: dict[str, Any]) -> dict[str, Any]:
    """One telemetry record: every served model's window (reset) and the device sample;
    with quality monitoring on, each served model's drift, estimate and labelled counts."""
    models = {}
    for loaded in server.models():
        name = loaded.installed.model
        snap = server.stats[name].snapshot(reset=True)
        models[name] = {"version": loaded.installed.version,
                        "variant": loaded.installed.variant.id,
                        "runtime": loaded.installed.variant.runtime, **snap}
        llm = lm_window(server, name)
        if llm is not None:  # language models: TTFT, prefill/decode tokens/s, tokens
            models[name]["llm"] = llm
    batch = {"device": device, "ts": time.time(), "models": models, "system": system,
             **extra}
    if server.quality is not None and models:
        batch["quality"] = server.quality.telemetry(
            {n: (m["version"], m["variant"]) for n, m in models.items()})
    return batch


# --- forwarding ----------------------------------------------------------------------------

class Publisher(Protocol):
    @property
    def connected(self) -> bool: ...

    def publish_acked(self, topic: str, payload: bytes, *, timeout_s: float,
                      qos: int = 1, retain: bool = False) -> int: ...


class TelemetryForwarder:
    """Drains the spool oldest-first on its own thread; never on the inference path."""

    def __init__(self, spool: TelemetrySpool, publisher: Publisher, topic: str, *,
                 ack_timeout_s: float = 10.0, idle_wait_s: float = 1.0) -> None:
        self.spool = spool
        self.publisher = publisher
        self.topic = topic
        self.ack_timeout_s = ack_timeout_s
        self.idle_wait_s = idle_wait_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edgeship-telemetry-fwd",
                                        daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """New records, or the session came back: drain now."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.ack_timeout_s + 2)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.idle_wait_s)
            self._wake.clear()
            try:
                self.drain()
            except Exception:  # the forwarder must outlive any single failure
                logger.exception("telemetry drain failed")

    def drain(self, max_records: int | None = None) -> int:
        """Send queued records until the queue is empty, the session drops, or a PUBACK
        does not come. Returns how many the broker took (success reason code)."""
        sent = 0
        while not self._stop.is_set() and self.publisher.connected and \
                (max_records is None or sent < max_records):
            batch = self.spool.claim(16)
            if not batch:
                break
            for seq, payload in batch:
                if not self._send_one(seq, payload):
                    self.spool.release()
                    return sent
                sent += 1
        self.spool.release()
        return sent

    def _send_one(self, seq: int, payload: bytes) -> bool:
        try:
            rc = self.publisher.publish_acked(self.topic, payload,
                                              timeout_s=self.ack_timeout_s)
        except TransferError as e:
            logger.info("telemetry record %d held back: %s", seq, e)
            return False
        if rc >= 0x80:
            logger.warning("broker refused telemetry record %d (reason %#x): dead-lettered",
                           seq, rc)
            self.spool.dead_letter(seq, rc)
        else:
            self.spool.ack(seq)
        return True


# --- the whole pipeline, as the agent runs it ------------------------------------------------

@dataclass(frozen=True)
class TelemetrySettings:
    device: str
    topic: str
    state_dir: Path
    interval_s: float = 60.0
    spool: SpoolSettings | None = None


class TelemetryService:
    """Ticker → spool (disk) → forwarder → broker. ``extra()`` adds agent facts (versions,
    update state, counters) to every record; it must be cheap and never block."""

    def __init__(self, settings: TelemetrySettings, server: ModelServer,
                 publisher: Publisher, extra: Callable[[], dict[str, Any]]) -> None:
        self.settings = settings
        self.server = server
        self.extra = extra
        self.spool = TelemetrySpool(settings.spool or SpoolSettings(
            settings.state_dir / "telemetry.db"))
        self.forwarder = TelemetryForwarder(self.spool, publisher, settings.topic)
        self.sampler = DeviceSampler(settings.state_dir)
        self.last_system: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.forwarder.start()
        self._thread = threading.Thread(target=self._run, name="edgeship-telemetry",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.forwarder.stop()
        self.spool.close()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.interval_s):
            try:
                self.tick()
            except Exception:  # a bad sample must not end telemetry
                logger.exception("telemetry tick failed")

    def tick(self) -> int:
        """Take one record into the spool and wake the forwarder; returns its seq."""
        self.last_system = self.sampler.sample()
        batch = build_batch(self.settings.device, self.server, self.last_system,
                            self.extra())
        stats = self.spool.stats()
        batch["spool"] = {"queued": stats.queued, "evicted": stats.evicted,
                          "dead_lettered": stats.dead_lettered}
        seq = self.spool.push(lambda n: protocol.encode("telemetry", {**batch, "seq": n}))
        self.forwarder.wake()
        return seq
