"""`release` is all-or-nothing and signs only what makes sense: a refused bundle leaves the
repository byte-identical, a killed release's temp files are gone after the next run, every
manifest field is checked before anything is signed, and metadata that is already expired
(host clock behind the repository) is never signed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from edgeship.agent.errors import BundleError
from edgeship.fleet.errors import RepositoryError
from edgeship.fleet.registry import Registry
from edgeship.fleet.tuf_repo import release_bundle, released_versions
from tests.fleet.helpers import make_bundle, make_tar
from tests.fleet.test_cli import run
from tests.support.attacks import BAD_MANIFESTS, edit_manifest, snapshot

ROOT = Path(__file__).resolve().parents[2]


def _corrupt(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(bytes([data[0] ^ 1]) + data[1:])


@pytest.mark.parametrize("as_tar", [False, True])
def test_refused_bundle_leaves_the_repository_byte_identical(repo, tmp_path, as_tar):
    keys, repo_dir = repo
    release_bundle(make_bundle(tmp_path / "ok", version=1), repo_dir, keys)
    before = snapshot(repo_dir)
    bundle = make_bundle(tmp_path / "bad", version=105)
    _corrupt(bundle / "golden.npz")  # the last file: manifest and variants verify first
    with pytest.raises(BundleError, match="golden.npz: sha256"):
        release_bundle(make_tar(bundle) if as_tar else bundle, repo_dir, keys)
    assert snapshot(repo_dir) == before
    assert released_versions(repo_dir) == {"digits": 1}


def test_refused_bundle_through_the_cli_exits_2_and_leaves_nothing(repo, tmp_path, capsys):
    keys, repo_dir = repo
    before = snapshot(repo_dir)
    bundle = make_bundle(tmp_path / "bad", version=105)
    _corrupt(bundle / "golden.npz")
    assert run("release", bundle, "--repo", repo_dir, "--keys", keys) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert snapshot(repo_dir) == before


def _big_tar(tmp_path: Path) -> Path:
    bundle = make_bundle(tmp_path / "big", version=2, payload=os.urandom(40 * 1024**2))
    return make_tar(bundle)


def _leftovers(repo_dir: Path) -> list[str]:
    return [str(p.relative_to(repo_dir)) for p in repo_dir.rglob("*")
            if p.name.startswith(".") and p.name not in (".lock",)]


def test_temp_files_of_a_killed_release_are_removed_by_the_next_run(repo, tmp_path):
    keys, repo_dir = repo
    tar = _big_tar(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "edgeship.cli", "release", str(tar),
                             "--repo", str(repo_dir), "--keys", str(keys)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not any(repo_dir.glob(".bundle-*/*")) and proc.poll() is None:
        assert time.monotonic() < deadline, "release never started extracting"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _leftovers(repo_dir), "the kill came too late to leave anything behind"
    assert released_versions(repo_dir) == {}

    release_bundle(make_bundle(tmp_path / "next", version=1), repo_dir, keys)
    assert _leftovers(repo_dir) == []
    assert released_versions(repo_dir) == {"digits": 1}


def test_unreferenced_files_of_a_release_killed_before_its_commit_are_removed(repo, tmp_path):
    keys, repo_dir = repo
    # what a release killed between moving its files in and signing leaves behind
    orphan = repo_dir / "targets" / "digits" / "7"
    orphan.mkdir(parents=True)
    (orphan / f"{'0' * 64}.model.onnx").write_bytes(b"x" * 1000)
    release_bundle(make_bundle(tmp_path / "next", version=1), repo_dir, keys)
    assert not orphan.exists()
    assert (repo_dir / "targets" / "digits" / "1").is_dir()


# --- manifest fields ------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_bad_manifest_fields_are_refused_with_one_line_and_exit_2(repo, tmp_path, capsys,
                                                                  case):
    keys, repo_dir = repo
    bundle = make_bundle(tmp_path / "b")
    edit_manifest(bundle, BAD_MANIFESTS[case])
    before = snapshot(repo_dir)
    db = tmp_path / "fleet.db"
    assert run("release", bundle, "--repo", repo_dir, "--keys", keys, "--db", db) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: " in err[0] and len(err[0]) < 400, err
    assert snapshot(repo_dir) == before


def test_the_largest_version_is_released_and_recorded(repo, tmp_path, capsys):
    keys, repo_dir = repo
    bundle = make_bundle(tmp_path / "b", version=2**63 - 1)
    db = tmp_path / "fleet.db"
    assert run("release", bundle, "--repo", repo_dir, "--keys", keys, "--db", db) == 0
    registry = Registry(db)
    assert registry.releases() == [("digits", 2**63 - 1, pytest.approx(time.time(), abs=60),
                                    "cli")]
    registry.close()


# --- clocks -----------------------------------------------------------------------------------

def test_host_clock_behind_the_repository_is_refused(repo, tmp_path, capsys):
    keys, repo_dir = repo
    # the fleet server (right clock) re-signed the timestamp; this host is a day behind
    ts = repo_dir / "metadata" / "timestamp.json"
    tomorrow = time.time() + 86_400
    os.utime(ts, (tomorrow, tomorrow))
    before = snapshot(repo_dir)
    assert run("release", make_bundle(tmp_path / "b"), "--repo", repo_dir, "--keys",
               keys) == 1  # the environment's fault, not the bundle's
    err = capsys.readouterr().err
    assert "clock" in err and len(err.strip().splitlines()) == 1
    assert snapshot(repo_dir) == before


def test_metadata_that_would_be_expired_is_never_signed(repo, tmp_path):
    keys, repo_dir = repo
    release_bundle(make_bundle(tmp_path / "a", version=1), repo_dir, keys)
    before = snapshot(repo_dir)
    day_behind = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(days=1)
    with pytest.raises(RepositoryError, match="clock"):
        release_bundle(make_bundle(tmp_path / "b", version=2), repo_dir, keys, now=day_behind)
    assert snapshot(repo_dir) == before


def test_root_expiring_within_the_timestamp_period_is_refused(repo, tmp_path):
    keys, repo_dir = repo
    soon = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=365) \
        - timedelta(hours=2)  # root (365 days) ends 2 h after this release's "now"
    before = snapshot(repo_dir)
    with pytest.raises(RepositoryError, match="root metadata expires"):
        release_bundle(make_bundle(tmp_path / "b", version=1), repo_dir, keys, now=soon)
    assert snapshot(repo_dir) == before
