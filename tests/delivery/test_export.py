"""Air-gapped releases, the archive side: ``edgeship release … --export FILE`` writes one
signed archive that python-tuf's client verifies from the file alone (no network), with the
same refusals as over the network: a tampered file, an older archive, a stale one."""

from __future__ import annotations

import io
import json
import tarfile
from datetime import timedelta
from pathlib import Path

import pytest
from tuf.api import exceptions as tuf_exc
from tuf.ngclient import Updater

from edgeship.agent.archive import ARCHIVE_URL, INDEX_NAME, ReleaseArchive
from edgeship.agent.errors import BundleError, Reason
from edgeship.agent.update.download import tuf_reason
from edgeship.cli import main
from edgeship.fleet.export import export_release
from edgeship.fleet.tuf_repo import _utcnow, init_repository, release_bundle
from tests.support.synthetic import write_synthetic_bundle


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    init_repository(root / "keys", root / "repo")
    for version in (1, 2):
        bundle = write_synthetic_bundle(root / f"b{version}", version=version, width=32,
                                        seed=version)
        release_bundle(bundle, root / "repo", root / "keys")
    return root


@pytest.fixture(scope="module")
def archives(fleet, tmp_path_factory):
    out = tmp_path_factory.mktemp("archives")
    return {v: export_release(fleet / "repo", fleet / "keys", "synth", v, out / f"v{v}.tar")
            for v in (1, 2)}


def device(tmp_path: Path, fleet: Path) -> Path:
    tuf_dir = tmp_path / "tuf"
    tuf_dir.mkdir()
    (tuf_dir / "root.json").write_bytes((fleet / "repo/metadata/1.root.json").read_bytes())
    return tuf_dir


def updater(tuf_dir: Path, archive: ReleaseArchive) -> Updater:
    return Updater(metadata_dir=str(tuf_dir), metadata_base_url=ARCHIVE_URL + "metadata/",
                   target_base_url=ARCHIVE_URL + "targets/", fetcher=archive.fetcher(),
                   bootstrap=None)


def install_targets(tuf_dir: Path, path: Path, dest: Path) -> list[str]:
    with ReleaseArchive(path) as archive:
        u = updater(tuf_dir, archive)
        u.refresh()
        got = []
        for name in ("manifest.json", "golden.npz"):
            info = u.get_targetinfo(f"{archive.index.model}/{archive.index.version}/{name}")
            u.download_target(info, filepath=str(dest / name))
            got.append(name)
        return got


def test_the_archive_verifies_from_the_file_alone(fleet, archives, tmp_path):
    e = archives[2]
    assert e.expires - _utcnow() > timedelta(days=29)  # outlives the 6 h timestamp
    with ReleaseArchive(e.path) as archive:
        assert (archive.index.model, archive.index.version) == ("synth", 2)
    assert install_targets(device(tmp_path, fleet), e.path, tmp_path) == [
        "manifest.json", "golden.npz"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["version"] == 2


def _rewrite(src: Path, dest: Path, change) -> Path:
    with tarfile.open(src) as tin, tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tout:
        for info in tin:
            data = tin.extractfile(info).read()
            data = change(info.name, data)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    return dest


def test_a_tampered_target_is_refused_as_over_the_network(fleet, archives, tmp_path):
    def flip(name: str, data: bytes) -> bytes:
        if name.startswith("targets/") and name.endswith("golden.npz"):
            return data[:-1] + bytes([data[-1] ^ 1])
        return data

    bad = _rewrite(archives[2].path, tmp_path / "bad.tar", flip)
    with pytest.raises(tuf_exc.RepositoryError) as e:
        install_targets(device(tmp_path, fleet), bad, tmp_path)
    assert tuf_reason(e.value) == Reason.HASH_MISMATCH


def test_tampered_metadata_is_refused(fleet, archives, tmp_path):
    def forge(name: str, data: bytes) -> bytes:
        if name.endswith(".targets.json"):
            return data.replace(b'"version": 2', b'"version": 9', 1)
        return data

    bad = _rewrite(archives[2].path, tmp_path / "forged.tar", forge)
    with pytest.raises(tuf_exc.RepositoryError) as e:
        install_targets(device(tmp_path, fleet), bad, tmp_path)
    assert tuf_reason(e.value) in (Reason.HASH_MISMATCH, Reason.BAD_SIGNATURE)


def test_an_older_archive_is_a_rollback(fleet, archives, tmp_path):
    tuf_dir = device(tmp_path, fleet)
    install_targets(tuf_dir, archives[2].path, tmp_path)  # the device trusts v2's metadata
    with pytest.raises(tuf_exc.RepositoryError) as e:
        install_targets(tuf_dir, archives[1].path, tmp_path)
    assert tuf_reason(e.value) == Reason.ROLLBACK


def test_not_an_archive_and_unsafe_members_are_refused(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar" * 100)
    with pytest.raises(BundleError, match="not a release archive"):
        ReleaseArchive(junk)
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        for name in (INDEX_NAME, "../etc/passwd"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(BundleError, match="unexpected archive member '../etc/passwd'"):
        ReleaseArchive(evil)


def test_cli_release_with_export_and_fleet_export(fleet, tmp_path, capsys):
    bundle = write_synthetic_bundle(tmp_path / "b3", version=3, width=32, seed=3)
    out = tmp_path / "v3.tar"
    assert main(["release", str(bundle), "--repo", str(fleet / "repo"), "--keys",
                 str(fleet / "keys"), "--export", str(out), "--valid-days", "7"]) == 0
    assert "edgeship agent install v3.tar" in capsys.readouterr().out
    assert ReleaseArchive(out).index.version == 3
    # the file exists: refused, untouched; an unreleased version: bad input
    before = out.read_bytes()
    assert main(["fleet", "export", "synth", "3", "--repo", str(fleet / "repo"), "--keys",
                 str(fleet / "keys"), "--export", str(out)]) == 2
    assert out.read_bytes() == before
    assert main(["fleet", "export", "synth", "9", "--repo", str(fleet / "repo"), "--keys",
                 str(fleet / "keys"), "--export", str(tmp_path / "v9.tar")]) == 2
    assert "synth v9 is not released" in capsys.readouterr().err
    assert not (tmp_path / "v9.tar").exists() and not (tmp_path / ".v9.tar.partial").exists()
