"""Real resource exhaustion for the hardening tests: a small tmpfs mounted over an agent's
state directory (ENOSPC for real, then more room by remounting) and RLIMIT_NOFILE of a
running agent process lowered with prlimit (EMFILE for real). Both need root; tests skip
where the kernel or the container refuses."""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
from pathlib import Path
from typing import Iterator

import pytest


def _mount(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@contextlib.contextmanager
def small_disk(path: Path, size_bytes: int) -> Iterator[Path]:
    """``path`` (created) backed by a tmpfs of ``size_bytes``; unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    done = _mount(["-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)])
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def resize_disk(path: Path, size_bytes: int) -> None:
    done = _mount(["-o", f"remount,size={size_bytes}", str(path)])
    assert done.returncode == 0, done.stderr


def fill_disk(path: Path, leave_bytes: int = 0) -> Path:
    """Fill the filesystem of ``path`` up to ``leave_bytes`` of free space."""
    filler = path / "filler.bin"
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize - leave_bytes
    with open(filler, "ab") as f:
        while free > 0:
            n = min(free, 1 << 20)
            try:
                f.write(b"\0" * n)
                f.flush()
            except OSError:
                break
            free -= n
    return filler


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def limit_fds(pid: int, soft: int) -> tuple[int, int]:
    """Lower the soft RLIMIT_NOFILE of a running process; returns the old limits."""
    old = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, old[1]))
    return old


def restore_fds(pid: int, limits: tuple[int, int]) -> None:
    resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
