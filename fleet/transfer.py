"""Serve byte ranges of repository files for transfer requests. No MQTT here.

Paths are checked twice: syntactically (:func:`agent.protocol.safe_repo_path`: relative,
under ``metadata/`` or ``targets/``, no ``..``) and then physically (the fully resolved path
must lie inside the resolved repository root, so a symlink cannot lead out of it). Hidden
files (temp files of atomic writes, the lock) are never served.
"""

from __future__ import annotations

import logging
import os
import stat
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
