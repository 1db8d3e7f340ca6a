"""Atomic file writes for the fleet side (the agent's ``fsutil`` plus create-only writes)."""

from __future__ import annotations

import os
from pathlib import Path

from edgeship.common.fsutil import atomic_write, fsync_dir  # one implementation, shared with the agent

__all__ = ["atomic_write", "fsync_dir", "write_new"]


def write_new(path: Path, data: bytes, *, mode: int) -> None:
    """Create ``path`` exclusively (never overwrite), durably, with ``mode`` from the start."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(Path(path).parent)
