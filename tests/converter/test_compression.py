"""zstd for transfer: the converter's .tar.zst and the agent's capped stream decompressor."""

from __future__ import annotations

import io
import os

import pytest
import zstandard

from edgeship.agent.compression import decompress_file, decompress_stream, is_zstd
from edgeship.agent.errors import BundleError
from edgeship.converter.compression import compress_file, zstd_size


def test_round_trip_and_size(tmp_path):
    data = os.urandom(1000) + b"\0" * 500_000
    src = tmp_path / "b.tar"
    src.write_bytes(data)
    zst = compress_file(src)
    assert zst.name == "b.tar.zst" and is_zstd(zst.read_bytes()[:4])
    assert zst.stat().st_size == zstd_size(src) < 20_000
    out = tmp_path / "out.tar"
    assert decompress_file(zst, out, max_output_bytes=len(data)) == len(data)
    assert out.read_bytes() == data


def test_decompression_bomb_is_rejected_without_leaving_output(tmp_path):
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (64 * 1024 * 1024))
    assert len(bomb) < 10_000
    src = tmp_path / "bomb.tar.zst"
    src.write_bytes(bomb)
    with pytest.raises(BundleError, match="over the cap of 1048576 bytes"):
        decompress_file(src, tmp_path / "out.tar", max_output_bytes=1024 * 1024)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.tar.zst"]


def test_bomb_without_declared_size_is_stopped_at_the_cap():
    # A streamed frame declares no content size: only counting output bytes catches it.
    buf = io.BytesIO()
    with zstandard.ZstdCompressor().stream_writer(buf, closefd=False) as w:
        for _ in range(64):
            w.write(b"\0" * (1024 * 1024))
    sink = io.BytesIO()
    with pytest.raises(BundleError, match="exceeds the cap"):
        decompress_stream(io.BytesIO(buf.getvalue()), sink, max_output_bytes=3 * 1024 * 1024)
    assert len(sink.getvalue()) <= 3 * 1024 * 1024


def test_exactly_at_the_cap_is_accepted():
    payload = b"x" * 100_000
    sink = io.BytesIO()
    frame = zstandard.ZstdCompressor().compress(payload)
    assert decompress_stream(io.BytesIO(frame), sink, max_output_bytes=100_000) == 100_000
    with pytest.raises(BundleError):
        decompress_stream(io.BytesIO(frame), io.BytesIO(), max_output_bytes=99_999)


def test_garbage_and_truncated_frames_are_bundle_errors(tmp_path):
    with pytest.raises(BundleError, match="bad zstd data"):
        decompress_stream(io.BytesIO(b"not zstd at all"), io.BytesIO(), 1 << 20)
    frame = zstandard.ZstdCompressor().compress(os.urandom(50_000))
    src = tmp_path / "t.zst"
    src.write_bytes(frame[: len(frame) // 2])
    with pytest.raises(BundleError):
        decompress_file(src, tmp_path / "t.out", 1 << 20)
    assert not (tmp_path / "t.out").exists()


def test_header_declaring_more_than_the_cap_is_refused_before_decompressing():
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(b"\0" * 2_000_000)
    with pytest.raises(BundleError, match="declares 2000000 bytes"):
        decompress_stream(io.BytesIO(frame), io.BytesIO(), max_output_bytes=1_000_000)
