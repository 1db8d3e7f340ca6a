"""Streaming zstd decompression with a hard cap on output size.

``edgeship convert`` packs a bundle as ``.tar.zst``. A hostile or corrupt frame could expand
to far more than the disk holds (a decompression bomb), so :func:`decompress_stream` counts
every byte it writes and stops with :class:`~agent.errors.BundleError` the moment the output
would exceed ``max_output_bytes`` — it never trusts the size a frame header declares, and it
never holds more than one chunk in memory. ``edgeship release`` (``fleet.bundle``) calls
:func:`decompress_file` on a ``.tar.zst`` before unpacking the tar, capped at the bundle size
limit; devices then fetch the bundle's files one by one as signed TUF targets, so they never
unpack a tar. It lives in ``agent`` (no torch, no fleet imports) so both sides can use it.
"""

from __future__ import annotations


import os
from pathlib import Path
from typing import BinaryIO, cast

from edgeship.agent.errors import BundleError
from edgeship.common.fsutil import atomic_output

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CHUNK_BYTES = 256 * 1024


def is_zstd(head: bytes) -> bool:
    """Whether ``head`` (the first bytes of a file) starts a zstd frame."""
    return head[:4] == ZSTD_MAGIC


def declared_size(head: bytes) -> int | None:
    """Content size a zstd frame header declares (``None`` if absent or unreadable)."""
    import zstandard

    try:
        size = zstandard.get_frame_parameters(head).content_size
    except zstandard.ZstdError:
        return None
    return None if size in (0, zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR) \
        else size


def decompress_stream(src: BinaryIO, dst: BinaryIO, max_output_bytes: int,
                      chunk_bytes: int = CHUNK_BYTES) -> int:
    """Decompress one zstd frame from ``src`` into ``dst``; returns the bytes written.

    Raises :class:`BundleError` if the output would exceed ``max_output_bytes`` (checked
    against the frame header first, then by counting every byte written, since a header
    can lie or be absent), if the data is not zstd, or if the frame declares a content
    size and ends before it (truncated). ``dst`` may hold a partial output afterwards:
    callers write to a temporary file and delete it on error (:func:`decompress_file`).
    """
    import zstandard

    if max_output_bytes < 0:
        raise ValueError("max_output_bytes must be >= 0")
    head = src.read(18)  # the largest zstd frame header
    if not is_zstd(head):
        raise BundleError("bad zstd data: no zstd frame magic")
    expected = declared_size(head)
    if expected is not None and expected > max_output_bytes:
        raise BundleError(f"zstd frame declares {expected} bytes, over the cap of "
                          f"{max_output_bytes} bytes (decompression bomb or wrong file)")
    reader = zstandard.ZstdDecompressor().stream_reader(
        cast(BinaryIO, _Prefixed(head, src)), closefd=False)  # it only calls read()
    written = 0
    try:
        while True:
            # Ask for one byte beyond the remaining budget so overflow is detected exactly.
            chunk = reader.read(min(chunk_bytes, max_output_bytes - written + 1))
            if not chunk:
                break
            written += len(chunk)
            if written > max_output_bytes:
                raise BundleError(f"zstd output exceeds the cap of {max_output_bytes} bytes"
                                  " (decompression bomb or wrong file)")
            dst.write(chunk)
    except zstandard.ZstdError as e:
        raise BundleError(f"bad zstd data: {e}") from e
    finally:
        reader.close()
    if expected is not None and written != expected:
        raise BundleError(f"zstd frame truncated: {written} of {expected} bytes")
    return written


class _Prefixed:
    """A read-only stream of ``head`` followed by the rest of ``src``."""

    def __init__(self, head: bytes, src: BinaryIO) -> None:
        self._head = head
        self._src = src

    def read(self, size: int = -1) -> bytes:
        if self._head:
            out, self._head = (self._head, b"") if size < 0 or size >= len(self._head) \
                else (self._head[:size], self._head[size:])
            return out
        return self._src.read(size)


def decompress_file(src: str | os.PathLike, dst: str | os.PathLike,
                    max_output_bytes: int) -> int:
    """Decompress the file ``src`` to ``dst`` atomically (temp file, fsync, rename).

    Nothing is left at ``dst`` (nor a temp file) when the cap is hit or the data is bad.
    """
    with open(src, "rb") as fin, atomic_output(Path(dst)) as fout:
        written = decompress_stream(fin, fout, max_output_bytes)
    return written
