"""Streaming zstd decompression with a hard cap on output size (device side).

A bundle travels as ``.tar.zst``. A hostile or corrupt frame could expand to far more than
the disk holds (a decompression bomb), so :func:`decompress_stream` counts every byte it
writes and stops with :class:`~agent.errors.BundleError` the moment the output would exceed
``max_output_bytes`` — it never trusts the size a frame header declares, and it never holds
more than one chunk in memory. The updater should call it on the downloaded file before
unpacking the tar (see :func:`decompress_file`), with the cap set to the bundle size the
signed TUF metadata declares (or the agent's ``max_bundle_bytes``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO

from agent.errors import BundleError

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CHUNK_BYTES = 256 * 1024


def is_zstd(head: bytes) -> bool:
    """Whether ``head`` (the first bytes of a file) starts a zstd frame."""
    return head[:4] == ZSTD_MAGIC


def decompress_stream(src: BinaryIO, dst: BinaryIO, max_output_bytes: int,
                      chunk_bytes: int = CHUNK_BYTES) -> int:
    """Decompress zstd from ``src`` into ``dst``; returns the bytes written.

    Raises :class:`BundleError` if the output would exceed ``max_output_bytes`` or the input
    is not valid zstd. ``dst`` may hold a partial output afterwards: callers write to a
    temporary file and delete it on error (:func:`decompress_file` does).
    """
    import zstandard

    if max_output_bytes < 0:
        raise ValueError("max_output_bytes must be >= 0")
    reader = zstandard.ZstdDecompressor().stream_reader(src, read_across_frames=True,
                                                        closefd=False)
    written = 0
    try:
        while True:
            # Ask for one byte beyond the remaining budget so overflow is detected exactly.
            chunk = reader.read(min(chunk_bytes, max_output_bytes - written + 1))
            if not chunk:
                return written
            written += len(chunk)
            if written > max_output_bytes:
                raise BundleError(f"zstd output exceeds the cap of {max_output_bytes} bytes"
                                  " (decompression bomb or wrong file)")
            dst.write(chunk)
    except zstandard.ZstdError as e:
        raise BundleError(f"bad zstd data: {e}") from e
    finally:
        reader.close()


def decompress_file(src: str | os.PathLike, dst: str | os.PathLike,
                    max_output_bytes: int) -> int:
    """Decompress the file ``src`` to ``dst`` atomically (temp file, fsync, rename).

    Nothing is left at ``dst`` (nor a temp file) when the cap is hit or the data is bad.
    """
    out = Path(dst)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    try:
        with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
            written = decompress_stream(fin, fout, max_output_bytes)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return written
