"""zstd for transfer: measure what a file compresses to, and pack a bundle tar as .tar.zst.

The device side (``agent.compression``) decompresses as a stream with a hard output cap.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgeship.common.fsutil import atomic_output

ZSTD_LEVEL = 19  # converter runs once on a host; devices only decompress (fast at any level)
CHUNK_BYTES = 1 << 20


def _compressor(level: int = ZSTD_LEVEL):
    import zstandard

    # Content size in the frame header lets a decoder refuse an oversized frame up front.
    return zstandard.ZstdCompressor(level=level, write_content_size=True, threads=0)


def zstd_size(path: str | os.PathLike, level: int = ZSTD_LEVEL) -> int:
    """Size in bytes of ``path`` compressed as one zstd frame."""
    data = Path(path).read_bytes()
    return len(_compressor(level).compress(data))


def compress_file(src: str | os.PathLike, dst: str | os.PathLike | None = None,
                  level: int = ZSTD_LEVEL) -> Path:
    """Write ``src`` as ``dst`` (default ``src + '.zst'``) atomically; returns ``dst``."""
    src = Path(src)
    out = Path(dst) if dst else src.with_name(src.name + ".zst")
    with open(src, "rb") as fin, atomic_output(out) as fout:
        _compressor(level).copy_stream(fin, fout, size=src.stat().st_size,
                                       read_size=CHUNK_BYTES, write_size=CHUNK_BYTES)
    return out
