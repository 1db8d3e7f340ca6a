"""Serve byte ranges of repository files for transfer requests. No MQTT here.

Paths are checked twice: syntactically (:func:`agent.protocol.safe_repo_path`: relative,
under ``metadata/`` or ``targets/``, no ``..``) and then physically (the fully resolved path
must lie inside the resolved repository root, so a symlink cannot lead out of it). Hidden
files (temp files of atomic writes, the lock) are never served.
"""

from __future__ import annotations

import errno
import functools
import heapq
import json
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgeship.agent.errors import ProtocolError
from edgeship.agent.protocol import MAX_CHUNK_BYTES, TransferRequest, safe_repo_path

logger = logging.getLogger(__name__)

STATUS_OK = 200
STATUS_BAD_REQUEST = 400
STATUS_NOT_FOUND = 404
STATUS_BAD_RANGE = 416
STATUS_INTERNAL = 500
RESOLVE_CACHE_ENTRIES = 4096  # resolved repository paths kept (a few hundred bytes each)


@dataclass(frozen=True)
class ChunkResult:
    status: int
    offset: int
    total: int
    data: bytes = b""
    error: str | None = None


def resolve_repo_file(repo_dir: Path, path: str) -> Path:
    """Map a repository path to a file strictly inside ``repo_dir``, or raise ProtocolError
    (bad path) / FileNotFoundError (no such regular file inside the root).

    A successful resolution is remembered (bounded LRU): resolving walks every component
    with ``lstat`` and was a quarter of the fleet server's CPU per chunk. Released files are
    never rewritten in place (consistent snapshots), the final open still refuses a symlink
    (``O_NOFOLLOW``), and a path that fails is never cached, so a file that appears later is
    found."""
    return _resolve_cached(str(repo_dir), path)


@functools.lru_cache(maxsize=RESOLVE_CACHE_ENTRIES)
def _resolve_cached(repo_dir: str, path: str) -> Path:
    path = safe_repo_path(path)
    if any(part.startswith(".") for part in path.split("/")):
        raise FileNotFoundError(path)
    root = Path(repo_dir).resolve(strict=True)
    resolved = (root / path).resolve(strict=True)
    subtree = root / path.split("/", 1)[0]
    if not resolved.is_relative_to(subtree):
        logger.warning("refusing %r: resolves to %s outside %s", path, resolved, subtree)
        raise FileNotFoundError(path)
    return resolved


def read_chunk(repo_dir: Path, request: TransferRequest) -> ChunkResult:
    """Read ``[offset, offset+length)`` of a repository file (length capped at
    MAX_CHUNK_BYTES). 400 bad path/range, 404 missing, 416 offset past the end."""
    offset = request.offset
    if offset < 0 or not 0 < request.length <= MAX_CHUNK_BYTES:
        return ChunkResult(STATUS_BAD_REQUEST, offset, 0,
                           error=f"bad range offset={offset} length={request.length}")
    try:
        resolved = resolve_repo_file(repo_dir, request.path)
        return _read_range(resolved, offset, request.length)
    except ProtocolError as e:
        return ChunkResult(STATUS_BAD_REQUEST, offset, 0, error=str(e))
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return ChunkResult(STATUS_NOT_FOUND, offset, 0, error=f"not found: {request.path}")
    except OSError as e:
        if e.errno == errno.ELOOP:  # a cached path became a symlink: never followed
            logger.warning("refusing %r: now a symlink", request.path)
            _resolve_cached.cache_clear()
            return ChunkResult(STATUS_NOT_FOUND, offset, 0, error=f"not found: {request.path}")
        logger.error("reading %s failed: %s", request.path, e)
        return ChunkResult(STATUS_INTERNAL, offset, 0, error="read failed")


def _read_range(resolved: Path, offset: int, length: int) -> ChunkResult:
    fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileNotFoundError(str(resolved))
        total = st.st_size
        if offset > total:
            return ChunkResult(STATUS_BAD_RANGE, offset, total,
                               error=f"offset {offset} beyond size {total}")
        data = os.pread(fd, min(length, total - offset), offset)
        return ChunkResult(STATUS_OK, offset, total, data)
    finally:
        os.close(fd)


# --- admission: concurrent-transfer cap and the kill switch -------------------------------

STATUS_GONE = 410  # the release's transfers were stopped (kill switch)
STATUS_BUSY = 503  # at the concurrent-transfer cap: the device retries with backoff
STOPPED_FILE = ".stopped-releases.json"  # hidden: never served
KILL_SWITCH_RECHECK_S = 0.2  # a stop reaches every fleet server within this


def release_of(path: str) -> tuple[str, int] | None:
    """``targets/{model}/{version}/…`` → (model, version); None for anything else."""
    parts = path.split("/")
    if len(parts) >= 4 and parts[0] == "targets" and parts[2].isdigit():
        return parts[1], int(parts[2])
    return None


def stop_release(repo_dir: Path, model: str, version: int, *, stopped: bool = True) -> None:
    """Kill switch: every fleet server on ``repo_dir`` answers 410 for this release's files
    from now on (``stopped=False`` lifts it). Shared through a file, so a CLI in another
    process and several fleet servers all see it."""
    from edgeship.fleet.files import atomic_write
    path = Path(repo_dir) / STOPPED_FILE
    current = set(_read_stopped(path))
    key = f"{model}/{version}"
    current = current | {key} if stopped else current - {key}
    atomic_write(path, json.dumps(sorted(current)).encode())
    logger.warning("release %s v%d %s", model, version, "stopped" if stopped else "resumed")


def _read_stopped(path: Path) -> list[str]:
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        logger.error("cannot read %s: %s", path, e)
        return []
    return [k for k in raw if isinstance(k, str)] if isinstance(raw, list) else []


class StoppedReleases:
    """Reads the kill-switch file, re-reading only when it changed; looks at it (one
    ``stat``) at most every ``recheck_s``, not on every chunk request."""

    def __init__(self, repo_dir: Path, recheck_s: float = KILL_SWITCH_RECHECK_S) -> None:
        self.path = Path(repo_dir) / STOPPED_FILE
        self.recheck_s = recheck_s
        self._stamp: tuple[int, int] | None = None
        self._checked_at = float("-inf")
        self._keys: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    def look_again(self) -> None:
        """The file was just written here: read it on the next check."""
        self._checked_at = float("-inf")

    def is_stopped(self, model: str, version: int) -> bool:
        now = time.monotonic()
        if now - self._checked_at < self.recheck_s:
            return f"{model}/{version}" in self._keys
        self._checked_at = now
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                self._keys = frozenset(_read_stopped(self.path)) if stamp else frozenset()
                self._stamp = stamp
            return f"{model}/{version}" in self._keys


class TransferGate:
    """Caps concurrent target transfers. A transfer is (device, path); it holds a slot from
    its first chunk until its last one, or until it has been idle for ``idle_s``. One device
    holds at most ``max_per_device`` slots: a device that starts another transfer gives up
    its least recently active one (a device downloads one file at a time; one that opens
    many — or restarts — cannot keep slots from the rest of the fleet)."""

    def __init__(self, max_transfers: int, idle_s: float = 60.0,
                 max_per_device: int = 2) -> None:
        if max_transfers < 1 or max_per_device < 1 or idle_s <= 0:
            raise ValueError("max_transfers >= 1, max_per_device >= 1, idle_s > 0")
        self.max_transfers = max_transfers
        self.max_per_device = max_per_device
        self.idle_s = idle_s
        self._active: dict[str, dict[str, float]] = {}  # device -> path -> last request
        self._count = 0
        self._lock = threading.Lock()

    def admit(self, device: str, path: str, now: float) -> bool:
        with self._lock:
            self._expire(now)
            mine = self._active.setdefault(device, {})
            if path in mine:
                mine[path] = now
                return True
            if len(mine) >= self.max_per_device:
                oldest = min(mine, key=mine.__getitem__)
                del mine[oldest]
                self._count -= 1
            elif self._count >= self.max_transfers:
                if not mine:
                    del self._active[device]
                return False
            mine[path] = now
            self._count += 1
            return True

    def _expire(self, now: float) -> None:
        for device, mine in list(self._active.items()):
            for path, seen in list(mine.items()):
                if now - seen > self.idle_s:
                    del mine[path]
                    self._count -= 1
            if not mine:
                del self._active[device]

    def finish(self, device: str, path: str) -> None:
        with self._lock:
            mine = self._active.get(device, {})
            if mine.pop(path, None) is not None:
                self._count -= 1
            if not mine:
                self._active.pop(device, None)

    def active(self) -> int:
        with self._lock:
            return self._count


# --- per-device byte-rate cap ---------------------------------------------------------------

class DeviceRateLimits:
    """One token bucket per requesting device, in bytes: ``reserve`` takes ``n`` bytes and
    says how long the answer must wait so the device stays under ``bytes_per_s`` (bursts
    up to ``burst_bytes``). Pure: the caller passes the clock. At most ``max_devices``
    buckets are kept (the least recently used go; a returning device starts full)."""

    def __init__(self, bytes_per_s: int, burst_bytes: int, max_devices: int = 100_000) -> None:
        if bytes_per_s < 0 or burst_bytes < 1 or max_devices < 1:
            raise ValueError("bytes_per_s >= 0, burst_bytes >= 1, max_devices >= 1")
        self.bytes_per_s, self.burst_bytes = bytes_per_s, burst_bytes
        self.max_devices = max_devices
        self._buckets: dict[str, tuple[float, float]] = {}  # device -> (tokens, at)
        self._lock = threading.Lock()

    def reserve(self, device: str, n: int, now: float) -> float:
        """Charge ``n`` bytes; return seconds to wait before sending them (0 = now)."""
        if self.bytes_per_s <= 0:
            return 0.0
        with self._lock:
            tokens, at = self._buckets.pop(device, (float(self.burst_bytes), now))
            tokens = min(float(self.burst_bytes), tokens + (now - at) * self.bytes_per_s)
            tokens -= n
            self._buckets[device] = (tokens, now)  # re-inserted: most recently used last
            if len(self._buckets) > self.max_devices:
                del self._buckets[next(iter(self._buckets))]
        return max(0.0, -tokens / self.bytes_per_s)

    def refund(self, device: str, n: int) -> None:
        """Give back a reservation that was not served (answered 503 instead)."""
        with self._lock:
            if device in self._buckets:
                tokens, at = self._buckets[device]
                self._buckets[device] = (min(float(self.burst_bytes), tokens + n), at)


class Pacer:
    """Sends answers at their due time from one thread, so workers never sleep. Holds at
    most ``max_pending`` answers (callers answer 503 when it is full)."""

    def __init__(self, send: Callable[[object], None], max_pending: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._send, self._clock = send, clock
        self.max_pending = max_pending
        self._heap: list[tuple[float, int, object]] = []
        self._seq = 0
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fleet-pacer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def schedule(self, due: float, item: object) -> bool:
        """Queue ``item`` for ``send`` at monotonic time ``due``; False when full."""
        with self._cv:
            if len(self._heap) >= self.max_pending:
                return False
            self._seq += 1
            heapq.heappush(self._heap, (due, self._seq, item))
            self._cv.notify()
            return True

    def pending(self) -> int:
        with self._cv:
            return len(self._heap)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and (not self._heap or
                                              self._heap[0][0] > self._clock()):
                    self._cv.wait(self._heap[0][0] - self._clock() if self._heap else None)
                if self._stopping:
                    return
                _, _, item = heapq.heappop(self._heap)
            try:
                self._send(item)
            except Exception:  # the pacer must survive anything one answer does
                logger.exception("paced answer failed")
