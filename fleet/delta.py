"""Make edgeship deltas on the host (see :mod:`agent.delta` for the format).

For ONNX files the delta is model-aware: every initializer whose bytes are unchanged (same
name, same raw bytes) in the base becomes a ``copy`` op; only changed tensors and the graph
travel, zstd-compressed. Anything else — or when it is smaller — gets a generic
``zstd --patch-from``-style delta. :func:`make_delta` keeps whichever is smaller and checks
the result by applying it before returning.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path

import zstandard

from edgeship.agent.delta import DeltaHeader, apply_delta

logger = logging.getLogger(__name__)

MIN_TENSOR_BYTES = 1024  # smaller tensors are cheaper inline than as a copy op
ZSTD_LEVEL = 19
ZSTD_LEVEL_BIG = 6  # level 19 over a 100 MB dictionary takes minutes
BIG_FILE_BYTES = 16 * 1024 * 1024


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _header(method: str, base: bytes, new: bytes, ops=()) -> DeltaHeader:
    return DeltaHeader(method, len(base), _sha(base), len(new), _sha(new), tuple(ops))


def zstd_patch(base: bytes, new: bytes, *, header_base: bytes | None = None) -> bytes:
    dictionary = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    window_log = max(20, min(31, (len(base) + len(new)).bit_length()))
    level = ZSTD_LEVEL if len(new) < BIG_FILE_BYTES else ZSTD_LEVEL_BIG
    params = zstandard.ZstdCompressionParameters.from_level(
        level, window_log=window_log, enable_ldm=True)
    body = zstandard.ZstdCompressor(dict_data=dictionary,
                                    compression_params=params).compress(new)
    return _header("zstd-patch", header_base or base, new).to_bytes() + body


def _initializers(model_bytes: bytes) -> dict[str, bytes]:
    import onnx  # host side only
    model = onnx.ModelProto()
    model.ParseFromString(model_bytes)
    return {t.name: t.raw_data for t in model.graph.initializer
            if len(t.raw_data) >= MIN_TENSOR_BYTES}


def onnx_tensor_ops(base: bytes, new: bytes) -> tuple[list, bytes]:
    """Ops and literal bytes rebuilding ``new`` from ``base``, reusing unchanged tensors."""
    old_tensors, new_tensors = _initializers(base), _initializers(new)
    spans = []  # (new_offset, length, base_offset)
    for name, raw in new_tensors.items():
        if old_tensors.get(name) != raw:
            continue
        at_new, at_base = new.find(raw), base.find(raw)
        if at_new >= 0 and at_base >= 0:
            spans.append((at_new, len(raw), at_base))
    ops, literals, pos = [], bytearray(), 0
    for at_new, n, at_base in sorted(spans):
        if at_new < pos:
            continue  # overlapping match (duplicate tensor bytes): leave inline
        if at_new > pos:
            ops.append(["data", at_new - pos])
            literals += new[pos:at_new]
        ops.append(["copy", at_base, n])
        pos = at_new + n
    if pos < len(new):
        ops.append(["data", len(new) - pos])
        literals += new[pos:]
    return ops, bytes(literals)


def onnx_delta(base: bytes, new: bytes, *, header_base: bytes | None = None) -> bytes:
    ops, literals = onnx_tensor_ops(base, new)
    level = ZSTD_LEVEL if len(literals) < BIG_FILE_BYTES else ZSTD_LEVEL_BIG
    body = zstandard.ZstdCompressor(level=level).compress(literals)
    return _header("onnx-tensors", header_base or base, new, ops).to_bytes() + body


def make_delta(base_path: Path, new_path: Path) -> bytes:
    """The smaller of the model-aware and the generic delta, verified by applying it."""
    base, new = Path(base_path).read_bytes(), Path(new_path).read_bytes()
    candidates = [zstd_patch(base, new)]
    if new_path.name.endswith(".onnx"):
        try:
            candidates.append(onnx_delta(base, new))
        except Exception as e:  # not parseable as ONNX: the generic delta still works
            logger.info("no model-aware delta for %s: %s", new_path.name, e)
    delta = min(candidates, key=len)
    with tempfile.TemporaryDirectory() as tmp:
        d, out = Path(tmp) / "d", Path(tmp) / "out"
        d.write_bytes(delta)
        apply_delta(d, Path(base_path), out, max_bytes=len(new))
        if out.read_bytes() != new:
            raise AssertionError("delta does not rebuild the file")  # a bug, never ship it
    return delta
