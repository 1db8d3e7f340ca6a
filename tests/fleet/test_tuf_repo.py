"""The TUF repository: init, release, refresh — verified by a real tuf.ngclient.Updater."""

from __future__ import annotations

import hashlib
import io
import json
import stat
import tarfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata

from edgeship.agent.errors import BundleError, ConfigError
from edgeship.fleet.errors import ReleaseRejectedError, RepositoryError
from edgeship.fleet.tuf_repo import (RepoSettings, init_repository, refresh_timestamp, release_bundle,
                            released_versions, verify_repository)
from tests.fleet.helpers import make_bundle, make_tar, make_updater


def _timestamp_version(repo_dir) -> int:
    return Metadata.from_file(str(repo_dir / "metadata" / "timestamp.json")).signed.version


def test_init_writes_version_1_metadata_and_private_keys(repo):
    keys, repo_dir = repo
    names = sorted(p.name for p in (repo_dir / "metadata").iterdir())
    assert names == ["1.root.json", "1.snapshot.json", "1.targets.json", "root.json",
                     "timestamp.json"]
    assert (repo_dir / "targets").is_dir()
    assert sorted(p.name for p in keys.iterdir()) == ["root-1.pem", "snapshot.pem",
                                                      "targets.pem", "timestamp.pem"]
    for key in keys.iterdir():
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    root = Metadata.from_file(str(repo_dir / "metadata" / "root.json")).signed
    assert root.consistent_snapshot and root.version == 1
    assert (root.expires - datetime.now(timezone.utc)).days in (364, 365)
    verify_repository(repo_dir)


def test_init_refuses_to_overwrite_an_existing_repository(repo, tmp_path):
    keys, repo_dir = repo
    before = (repo_dir / "metadata" / "root.json").read_bytes()
    with pytest.raises(RepositoryError, match="already"):
        init_repository(tmp_path / "other-keys", repo_dir)
    with pytest.raises(RepositoryError, match="already"):
        init_repository(keys, tmp_path / "other-repo")
    assert (repo_dir / "metadata" / "root.json").read_bytes() == before


def test_bad_settings_name_the_key():
    with pytest.raises(ConfigError, match="root_threshold") as e:
        RepoSettings(root_threshold=0)
    assert e.value.key == "root_threshold"


def test_released_bundle_verifies_with_a_real_updater(repo, tmp_path):
    keys, repo_dir = repo
    bundle = make_bundle(tmp_path / "bundles")
    info = release_bundle(bundle, repo_dir, keys)
    assert (info.model, info.version) == ("digits", 1)
    assert info.targets == ("digits/1/manifest.json", "digits/1/onnx-fp32.onnx",
                            "digits/1/onnx-int8.onnx", "digits/1/golden.npz")

    updater, fetcher = make_updater(repo_dir, tmp_path / "client")
    updater.refresh()
    manifest_info = updater.get_targetinfo("digits/1/manifest.json")
    assert manifest_info.custom == {"edgeship": {"model": "digits", "version": 1,
                                                 "kind": "manifest"}}
    variant = updater.get_targetinfo("digits/1/onnx-int8.onnx")
    assert variant.custom["edgeship"] == {
        "model": "digits", "version": 1, "kind": "variant", "variant": "onnx-int8",
        "runtime": "onnxruntime", "precision": "int8", "hardware": ["aarch64", "armv7l"]}
    assert updater.get_targetinfo("digits/1/golden.npz").custom["edgeship"]["kind"] == "golden"

    path = updater.download_target(variant)
    data = (bundle / "onnx-int8.onnx").read_bytes()
    assert Path(path).read_bytes() == data
    sha = hashlib.sha256(data).hexdigest()
    assert f"targets/digits/1/{sha}.onnx-int8.onnx" in fetcher.paths
    assert {"metadata/2.root.json", "metadata/timestamp.json", "metadata/2.snapshot.json",
            "metadata/2.targets.json"} <= set(fetcher.paths)
    assert (repo_dir / "targets" / "digits" / "1" / f"{sha}.onnx-int8.onnx").is_file()


def test_tar_bundle_release_is_seen_by_an_existing_client(repo, tmp_path):
    keys, repo_dir = repo
    release_bundle(make_bundle(tmp_path / "b"), repo_dir, keys)
    updater, _ = make_updater(repo_dir, tmp_path / "client")
    updater.refresh()
    assert updater.get_targetinfo("digits/2/manifest.json") is None

    for top_dir, version in ((True, 2), (False, 3)):
        tar = make_tar(make_bundle(tmp_path / "b", version=version), top_dir=top_dir)
        release_bundle(tar, repo_dir, keys)
    updater, _ = make_updater(repo_dir, tmp_path / "client")  # same cache dir
    updater.refresh()
    for version in (1, 2, 3):
        assert updater.get_targetinfo(f"digits/{version}/onnx-fp32.onnx") is not None
    assert released_versions(repo_dir) == {"digits": 3}
    assert not [p for p in repo_dir.rglob(".*") if p.name != ".lock"]  # no temp leftovers


@pytest.mark.parametrize("version", [2, 1])
def test_rollback_of_model_version_is_rejected(repo, tmp_path, version):
    keys, repo_dir = repo
    release_bundle(make_bundle(tmp_path / "a", version=2), repo_dir, keys)
    before = _timestamp_version(repo_dir)
    with pytest.raises(ReleaseRejectedError, match="not newer than released v2") as e:
        release_bundle(make_bundle(tmp_path / "b", version=version, payload=b"x"),
                       repo_dir, keys)
    assert (e.value.model, e.value.version, e.value.latest) == ("digits", version, 2)
    assert _timestamp_version(repo_dir) == before
    release_bundle(make_bundle(tmp_path / "c", model="other", version=1), repo_dir, keys)
    assert released_versions(repo_dir) == {"digits": 2, "other": 1}


def test_bundle_file_that_does_not_match_its_manifest_is_rejected(repo, tmp_path):
    keys, repo_dir = repo
    bundle = make_bundle(tmp_path / "b")
    data = (bundle / "onnx-int8.onnx").read_bytes()
    (bundle / "onnx-int8.onnx").write_bytes(bytes([data[0] ^ 1]) + data[1:])
    with pytest.raises(BundleError, match="onnx-int8.onnx: sha256"):
        release_bundle(bundle, repo_dir, keys)
    (bundle / "onnx-int8.onnx").write_bytes(data + b"more")
    with pytest.raises(BundleError, match="onnx-int8.onnx: size"):
        release_bundle(bundle, repo_dir, keys)
    (bundle / "onnx-fp32.onnx").unlink()
    with pytest.raises(BundleError, match="lacks 'onnx-fp32.onnx'"):
        release_bundle(bundle, repo_dir, keys)
    assert _timestamp_version(repo_dir) == 1
    assert released_versions(repo_dir) == {}


def _evil_tar(tmp_path, kind: str):
    path = tmp_path / f"{kind}.tar"
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo("manifest.json")
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tf.addfile(info)
        else:
            info.name = {"dotdot": "../manifest.json", "absolute": "/tmp/manifest.json",
                         "nested": "a/b/manifest.json"}[kind]
            info.size = 2
            tf.addfile(info, io.BytesIO(b"{}"))
    return path


@pytest.mark.parametrize("kind", ["symlink", "dotdot", "absolute", "nested"])
def test_unsafe_tar_members_are_rejected(repo, tmp_path, kind):
    keys, repo_dir = repo
    with pytest.raises(BundleError, match="tar member"):
        release_bundle(_evil_tar(tmp_path, kind), repo_dir, keys)
    assert not (tmp_path / "manifest.json").exists()


def test_oversized_tar_is_rejected(repo, tmp_path):
    from edgeship.fleet.bundle import BundleLimits, extract_tar
    tar = make_tar(make_bundle(tmp_path / "b"))
    (tmp_path / "out").mkdir()
    with pytest.raises(BundleError, match="exceeds"):
        extract_tar(tar, tmp_path / "out", BundleLimits(max_bundle_bytes=100))


def test_tar_zst_bundle_from_the_converter_is_released(repo, tmp_path):
    """``edgeship convert`` writes a .tar.zst beside the .tar: release takes it as it is."""
    from edgeship.converter.compression import compress_file
    keys, repo_dir = repo
    zst = compress_file(make_tar(make_bundle(tmp_path / "b", version=4)))
    release_bundle(zst, repo_dir, keys)
    assert released_versions(repo_dir) == {"digits": 4}
    assert not [p for p in repo_dir.rglob(".*") if p.name != ".lock"]  # no temp leftovers


def test_zstd_bomb_is_refused_before_it_is_written_out(repo, tmp_path):
    """A .tar.zst that expands past the bundle size limit is refused; nothing is released."""
    from edgeship.converter.compression import compress_file
    keys, repo_dir = repo
    big = tmp_path / "bomb.tar"
    big.write_bytes(bytes(64 * 1024 * 1024))  # 64 MiB of zeros: a few KiB compressed
    zst = compress_file(big)
    assert zst.stat().st_size < 64 * 1024
    with pytest.raises(BundleError, match="over the cap"):
        release_bundle(zst, repo_dir, keys, RepoSettings(max_bundle_bytes=1024 * 1024))
    assert released_versions(repo_dir) == {}
    assert not [p for p in repo_dir.rglob(".*") if p.name != ".lock"]


def test_release_with_keys_of_another_repository_is_refused(repo, tmp_path):
    _, repo_dir = repo
    init_repository(tmp_path / "k2", tmp_path / "r2")
    with pytest.raises(RepositoryError, match="not a targets key"):
        release_bundle(make_bundle(tmp_path / "b"), repo_dir, tmp_path / "k2")
    assert released_versions(repo_dir) == {}


def test_refresh_timestamp_extends_expiry_and_clients_accept_it(repo, tmp_path):
    keys, repo_dir = repo
    release_bundle(make_bundle(tmp_path / "b"), repo_dir, keys)
    assert refresh_timestamp(repo_dir, keys) == 3
    snap_v = json.loads((repo_dir / "metadata" / "timestamp.json").read_text())
    assert snap_v["signed"]["meta"]["snapshot.json"]["version"] == 2

    later = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=5)
    refresh_timestamp(repo_dir, keys, now=later)  # snapshot (7 d) is past half-life
    ts = Metadata.from_file(str(repo_dir / "metadata" / "timestamp.json")).signed
    assert ts.snapshot_meta.version == 3 and ts.expires == later + timedelta(hours=6)
    updater, _ = make_updater(repo_dir, tmp_path / "client")
    updater.refresh()
    assert updater.get_targetinfo("digits/1/manifest.json") is not None


def test_root_threshold_two_needs_two_root_keys(tmp_path):
    keys, repo_dir = tmp_path / "keys", tmp_path / "repo"
    init_repository(keys, repo_dir, RepoSettings(root_threshold=2))
    root_md = Metadata.from_file(str(repo_dir / "metadata" / "1.root.json"))
    assert root_md.signed.roles["root"].threshold == 2
    assert len(root_md.signed.roles["root"].keyids) == 2 == len(root_md.signatures)
    release_bundle(make_bundle(tmp_path / "b"), repo_dir, keys)
    updater, _ = make_updater(repo_dir, tmp_path / "client")
    updater.refresh()
    assert updater.get_targetinfo("digits/1/golden.npz") is not None
