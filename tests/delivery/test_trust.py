"""Trust on the host side, checked by a real ``tuf.ngclient.Updater``: offline root keys,
root thresholds and rotation, short-lived timestamps, and the device's version floor."""

from __future__ import annotations

import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import pytest
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Timestamp
from tuf.ngclient import FetcherInterface, Updater

from edgeship.agent.errors import VerificationError
from edgeship.agent.trust import VersionFloor
from edgeship.fleet.errors import RepositoryError
from edgeship.fleet.tuf_repo import (RepoSettings, init_repository, refresh_timestamp, rotate_root,
                            release_bundle)


class DirFetcher(FetcherInterface):
    """Serves a repository directory to a real Updater (``file:`` style, no network)."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo

    def _fetch(self, url: str) -> Iterator[bytes]:
        path = self.repo / url.split("://", 1)[1].split("/", 1)[1]
        if not path.is_file():
            raise tuf_exc.DownloadHTTPError(f"404 {url}", 404)
        return iter([path.read_bytes()])


def _device(repo: Path, tmp: Path) -> Updater:
    tmp.mkdir(parents=True, exist_ok=True)
    if not (tmp / "root.json").exists():
        shutil.copyfile(repo / "metadata" / "1.root.json", tmp / "root.json")
    return Updater(metadata_dir=str(tmp), metadata_base_url="x://r/metadata/",
                   target_base_url="x://r/targets/", fetcher=DirFetcher(repo), bootstrap=None)


def test_keys_init_keeps_root_keys_offline_with_a_threshold(tmp_path):
    keys, root_keys, repo = tmp_path / "online", tmp_path / "offline", tmp_path / "repo"
    init_repository(keys, repo, RepoSettings(root_threshold=2, root_keys=3),
                    root_keys_dir=root_keys)
    assert sorted(p.name for p in keys.iterdir()) == ["snapshot.pem", "targets.pem",
                                                      "timestamp.pem"]
    assert len(list(root_keys.glob("root-*.pem"))) == 3
    root = Metadata.from_bytes((repo / "metadata" / "1.root.json").read_bytes())
    assert root.signed.roles["root"].threshold == 2 and len(root.signatures) == 3
    # online operations work without the offline root keys
    refresh_timestamp(repo, keys)
    _device(repo, tmp_path / "dev").refresh()


def test_timestamp_is_short_lived_and_re_signed_with_the_online_key(tmp_path):
    keys, repo = tmp_path / "k", tmp_path / "r"
    init_repository(keys, repo)
    ts = Metadata.from_bytes((repo / "metadata" / "timestamp.json").read_bytes())
    lifetime = ts.signed.expires - datetime.now(timezone.utc)
    assert timedelta(hours=1) < lifetime <= timedelta(hours=6)
    v = refresh_timestamp(repo, keys)
    again = Metadata[Timestamp].from_bytes((repo / "metadata" / "timestamp.json").read_bytes())
    assert again.signed.version == v == ts.signed.version + 1


def test_root_rotation_is_followed_by_a_device_pinned_to_the_old_root(tmp_path,
                                                                      digits_bundles):
    keys, old_root, new_root, repo = (tmp_path / n for n in ("k", "r1", "r2", "repo"))
    init_repository(keys, repo, RepoSettings(root_threshold=1), root_keys_dir=old_root)
    device = tmp_path / "dev"
    _device(repo, device).refresh()
    assert rotate_root(repo, old_root, new_root, threshold=2, keys=3) == 2
    root2 = Metadata.from_bytes((repo / "metadata" / "2.root.json").read_bytes())
    assert len(root2.signatures) == 4  # 1 old + 3 new: both thresholds met
    release_bundle(digits_bundles[1].bundle_dir, repo, keys)
    updater = _device(repo, device)
    updater.refresh()
    trusted = Metadata.from_bytes((device / "root.json").read_bytes())
    assert trusted.signed.version == 2 and trusted.signed.roles["root"].threshold == 2
    assert updater.get_targetinfo("digits/1/manifest.json") is not None
    # the old root keys can no longer sign a root on their own
    with pytest.raises(RepositoryError):
        rotate_root(repo, old_root, tmp_path / "r3", threshold=1)


def test_version_floor_is_persisted_and_refuses_older_versions(tmp_path):
    floor = VersionFloor(tmp_path / "floor.json")
    floor.raise_to("m", 5)
    floor.raise_to("m", 3)  # never lowered
    again = VersionFloor(tmp_path / "floor.json")
    assert again.get("m") == 5
    again.check("m", 5)
    again.check("m", 6)
    with pytest.raises(VerificationError) as e:
        again.check("m", 4)
    assert e.value.reason_code == "rollback"
