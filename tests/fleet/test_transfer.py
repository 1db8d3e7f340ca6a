"""read_chunk: ranges, missing files, and every way out of the repository root."""

from __future__ import annotations

import os

import pytest

from edgeship.agent.errors import ProtocolError
from edgeship.agent.protocol import MAX_CHUNK_BYTES, TransferRequest
from edgeship.fleet.transfer import read_chunk

DATA = bytes(range(256)) * 4  # 1024 bytes


@pytest.fixture
def repo_dir(tmp_path):
    root = tmp_path / "repo"
    (root / "metadata").mkdir(parents=True)
    (root / "targets" / "m" / "1").mkdir(parents=True)
    (root / "targets" / "m" / "1" / "abc.model.onnx").write_bytes(DATA)
    (root / "metadata" / "timestamp.json").write_bytes(b"{}")
    (tmp_path / "secret.txt").write_bytes(b"outside")
    return root


def _req(path, offset=0, length=100):
    return TransferRequest(path, offset, length)  # unvalidated on purpose


@pytest.mark.parametrize("offset,length", [(0, 100), (100, 200), (1000, 100), (0, 4096)])
def test_serves_the_requested_range(repo_dir, offset, length):
    result = read_chunk(repo_dir, _req("targets/m/1/abc.model.onnx", offset, length))
    assert (result.status, result.offset, result.total) == (200, offset, 1024)
    assert result.data == DATA[offset:offset + length] and result.error is None


def test_offset_at_the_end_is_empty_and_past_the_end_is_416(repo_dir):
    at_end = read_chunk(repo_dir, _req("targets/m/1/abc.model.onnx", 1024))
    assert (at_end.status, at_end.data, at_end.total) == (200, b"", 1024)
    past = read_chunk(repo_dir, _req("targets/m/1/abc.model.onnx", 1025))
    assert (past.status, past.total, past.data) == (416, 1024, b"")


@pytest.mark.parametrize("path", ["targets/m/1/nope.onnx", "metadata/2.snapshot.json",
                                  "targets/m", "targets/m/1/abc.model.onnx/x"])
def test_missing_files_and_directories_are_404(repo_dir, path):
    result = read_chunk(repo_dir, _req(path))
    assert result.status == 404 and result.data == b""


@pytest.mark.parametrize("path", ["targets/../../secret.txt", "targets/../metadata/x",
                                  "/etc/passwd", "secret.txt", "../secret.txt",
                                  "targets//m", "targets/./m", ""])
def test_traversal_and_bad_paths_are_400(repo_dir, path):
    result = read_chunk(repo_dir, _req(path))
    assert result.status == 400 and result.data == b""
    with pytest.raises(ProtocolError):
        TransferRequest.from_bytes(TransferRequest(path, 0, 10).to_bytes())


def test_symlink_out_of_the_root_is_not_followed(repo_dir):
    os.symlink(repo_dir.parent / "secret.txt", repo_dir / "targets" / "evil")
    os.symlink("/etc", repo_dir / "targets" / "etc")
    os.symlink(repo_dir / "metadata" / "timestamp.json", repo_dir / "targets" / "cross")
    for path in ("targets/evil", "targets/etc/passwd", "targets/cross"):
        assert read_chunk(repo_dir, _req(path)).status == 404, path


def test_hidden_files_are_not_served(repo_dir):
    (repo_dir / "targets" / ".abc.model.onnx.tmp").write_bytes(b"partial")
    assert read_chunk(repo_dir, _req("targets/.abc.model.onnx.tmp")).status == 404


def test_bad_ranges_are_400(repo_dir):
    for offset, length in ((-1, 10), (0, 0), (0, MAX_CHUNK_BYTES + 1)):
        result = read_chunk(repo_dir, _req("targets/m/1/abc.model.onnx", offset, length))
        assert result.status == 400


def test_resolution_cache_finds_late_files_and_never_follows_a_swapped_in_symlink(repo_dir):
    """Resolved paths are cached (the fleet server resolves every chunk request): a missing
    file is not remembered as missing, and replacing a served file by a symlink out of the
    root after it was cached still serves nothing from outside."""
    late = repo_dir / "targets" / "m" / "1" / "late.onnx"
    assert read_chunk(repo_dir, _req("targets/m/1/late.onnx")).status == 404
    late.write_bytes(b"arrived")
    assert read_chunk(repo_dir, _req("targets/m/1/late.onnx")).data == b"arrived"
    late.unlink()
    os.symlink(repo_dir.parent / "secret.txt", late)
    result = read_chunk(repo_dir, _req("targets/m/1/late.onnx"))
    assert result.status == 404 and b"outside" not in result.data
