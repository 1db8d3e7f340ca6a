"""Apply edgeship deltas on the device: rebuild version N+1 of a file from version N.

A delta file is ``MAGIC`` + 4-byte big-endian header length + a JSON header + a body:

- ``onnx-tensors``: the header lists ops ``["copy", base_offset, length]`` (a tensor that did
  not change, copied from the installed model) and ``["data", length]`` (bytes taken in order
  from the body, a zstd stream of everything that changed: new tensors and the graph);
- ``zstd-patch``: the body is a zstd frame compressed with the base file as a raw-content
  dictionary (``zstd --patch-from``).

The header names the base by sha256, so a delta is never applied to the wrong file. The
rebuilt file's length and sha256 are then checked against the signed TUF target by the
caller; any mismatch means: throw it away and download the full file.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from edgeship.agent.errors import EdgeshipError, Reason
from edgeship.common.fsutil import sha256_file

logger = logging.getLogger(__name__)

MAGIC = b"ESDELTA1"
MAX_HEADER_BYTES = 4 * 1024 * 1024
METHODS = ("onnx-tensors", "zstd-patch")
_BLOCK = 1 << 20


class DeltaError(EdgeshipError):
    reason_code = Reason.DELTA_MISMATCH


@dataclass(frozen=True)
class DeltaHeader:
    method: str
    base_size: int
    base_sha256: str
    target_size: int
    target_sha256: str
    ops: tuple[tuple, ...] = ()

    def to_bytes(self) -> bytes:
        doc = {"method": self.method, "base_size": self.base_size,
               "base_sha256": self.base_sha256, "target_size": self.target_size,
               "target_sha256": self.target_sha256, "ops": [list(o) for o in self.ops]}
        raw = json.dumps(doc, separators=(",", ":")).encode()
        return MAGIC + struct.pack(">I", len(raw)) + raw


def read_header(f: BinaryIO) -> DeltaHeader:
    if f.read(len(MAGIC)) != MAGIC:
        raise DeltaError("not an edgeship delta (bad magic)")
    (size,) = struct.unpack(">I", f.read(4).rjust(4, b"\0"))
    if size > MAX_HEADER_BYTES:
        raise DeltaError(f"delta header of {size} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        doc = json.loads(f.read(size))
        header = DeltaHeader(method=doc["method"], base_size=int(doc["base_size"]),
                             base_sha256=str(doc["base_sha256"]),
                             target_size=int(doc["target_size"]),
                             target_sha256=str(doc["target_sha256"]),
                             ops=tuple(tuple(o) for o in doc.get("ops", [])))
    except (ValueError, KeyError, TypeError) as e:
        raise DeltaError(f"malformed delta header: {e}") from e
    if header.method not in METHODS:
        raise DeltaError(f"unknown delta method {header.method!r}")
    return header


def apply_delta(delta_path: Path, base_path: Path, out_path: Path, *,
                max_bytes: int) -> DeltaHeader:
    """Rebuild into ``out_path``; raise DeltaError if the base is not the one the delta was
    made from, the delta is malformed, or the result is not what its header promises."""
    with open(delta_path, "rb") as f:
        header = read_header(f)
        if header.target_size > max_bytes:
            raise DeltaError(f"delta target of {header.target_size} bytes exceeds the cap")
        if base_path.stat().st_size != header.base_size or \
                sha256_file(base_path) != header.base_sha256:
            raise DeltaError(f"delta was made from another base than {base_path.name}")
        with open(base_path, "rb") as base, open(out_path, "wb") as out:
            if header.method == "zstd-patch":
                _apply_zstd(f, base, out, header)
            else:
                _apply_ops(f, base, out, header)
    if out_path.stat().st_size != header.target_size or \
            sha256_file(out_path) != header.target_sha256:
        raise DeltaError("rebuilt file does not match the delta's own checksum")
    return header


def _apply_zstd(f: BinaryIO, base: BinaryIO, out: BinaryIO, header: DeltaHeader) -> None:
    dictionary = zstandard.ZstdCompressionDict(base.read(),
                                               dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    window = max(1 << 20, header.base_size + header.target_size)
    dctx = zstandard.ZstdDecompressor(dict_data=dictionary, max_window_size=1 << 31 if
                                      window > 1 << 27 else 1 << 27)
    _copy_limited(dctx.stream_reader(f), out, header.target_size)


def _apply_ops(f: BinaryIO, base: BinaryIO, out: BinaryIO, header: DeltaHeader) -> None:
    literals = zstandard.ZstdDecompressor().stream_reader(f)
    written = 0
    for op in header.ops:
        if op[0] == "copy" and len(op) == 3:
            src, n = int(op[1]), int(op[2])
            if src < 0 or src + n > header.base_size:
                raise DeltaError(f"copy op {op!r} outside the base")
            base.seek(src)
            _copy_exact(base, out, n)
        elif op[0] == "data" and len(op) == 2:
            n = int(op[1])
            _copy_exact(literals, out, n)
        else:
            raise DeltaError(f"unknown delta op {op!r}")
        written += n
        if written > header.target_size:
            raise DeltaError("delta writes past its declared size")


def _copy_exact(src, out: BinaryIO, n: int) -> None:
    while n > 0:
        block = src.read(min(n, _BLOCK))
        if not block:
            raise DeltaError("delta ends early")
        out.write(block)
        n -= len(block)


def _copy_limited(src, out: BinaryIO, limit: int) -> None:
    written = 0
    while block := src.read(_BLOCK):
        written += len(block)
        if written > limit:
            raise DeltaError("delta expands past its declared size")
        out.write(block)
