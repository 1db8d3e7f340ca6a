"""Serve byte ranges of repository files for transfer requests. No MQTT here.

Paths are checked twice: syntactically (:func:`agent.protocol.safe_repo_path`: relative,
under ``metadata/`` or ``targets/``, no ``..``) and then physically (the fully resolved path
must lie inside the resolved repository root, so a symlink cannot lead out of it). Hidden
files (temp files of atomic writes, the lock) are never served.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from agent.errors import ProtocolError
from agent.protocol import MAX_CHUNK_BYTES, TransferRequest, safe_repo_path

logger = logging.getLogger(__name__)

STATUS_OK = 200
STATUS_BAD_REQUEST = 400
STATUS_NOT_FOUND = 404
STATUS_BAD_RANGE = 416
STATUS_INTERNAL = 500


@dataclass(frozen=True)
class ChunkResult:
    status: int
    offset: int
    total: int
    data: bytes = b""
    error: str | None = None


def resolve_repo_file(repo_dir: Path, path: str) -> Path:
    """Map a repository path to a file strictly inside ``repo_dir``, or raise ProtocolError
    (bad path) / FileNotFoundError (no such regular file inside the root)."""
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
    from fleet.files import atomic_write
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
    """Reads the kill-switch file, re-reading only when it changed."""

    def __init__(self, repo_dir: Path) -> None:
        self.path = Path(repo_dir) / STOPPED_FILE
        self._stamp: tuple[int, int] | None = None
        self._keys: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    def is_stopped(self, model: str, version: int) -> bool:
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
    its first chunk until its last one, or until it has been idle for ``idle_s``."""

    def __init__(self, max_transfers: int, idle_s: float = 60.0) -> None:
        self.max_transfers = max_transfers
        self.idle_s = idle_s
        self._active: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def admit(self, device: str, path: str, now: float) -> bool:
        key = (device, path)
        with self._lock:
            for k, seen in list(self._active.items()):
                if now - seen > self.idle_s:
                    del self._active[k]
            if key not in self._active and len(self._active) >= self.max_transfers:
                return False
            self._active[key] = now
            return True

    def finish(self, device: str, path: str) -> None:
        with self._lock:
            self._active.pop((device, path), None)

    def active(self) -> int:
        with self._lock:
            return len(self._active)
