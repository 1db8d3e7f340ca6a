"""Export a released model version as one signed archive for devices with no broker
(``edgeship release … --export FILE``; the layout is in ``agent.archive``).

A device installs it days or weeks later, while timestamp metadata normally lives hours: the
export signs new snapshot and timestamp metadata (and targets, if they would expire sooner)
valid for ``valid_days``, commits them to the repository like any re-signing — versions stay
unique and increasing, so an online device accepts them too — and packs them with every root
version and the release's target files. The trade-off, stated: for ``valid_days`` these
metadata versions stay acceptable to a device that sees nothing newer (the freeze window of
an air-gapped install is as long as the operator chooses).
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path

from tuf.api.metadata import Snapshot, Targets, Timestamp

from edgeship.agent.archive import INDEX_NAME, ReleaseIndex
from edgeship.agent.errors import ConfigError
from edgeship.fleet.tuf_repo import (RepoSettings, _commit, _load_current, _locked, _utcnow,
                                     load_signers)

logger = logging.getLogger(__name__)

MAX_VALID_DAYS = 366


@dataclass(frozen=True)
class ExportInfo:
    path: Path
    model: str
    version: int
    targets: tuple[str, ...]
    expires: datetime
    size: int


def export_release(repo_dir: Path, keys_dir: Path, model: str, version: int, out: Path, *,
                   valid_days: int = 30, settings: RepoSettings = RepoSettings(),
                   now: datetime | None = None) -> ExportInfo:
    """Write ``out`` (must not exist): the signed archive of ``model`` v``version``."""
    repo_dir, out = Path(repo_dir), Path(out)
    if not 1 <= valid_days <= MAX_VALID_DAYS:
        raise ConfigError(f"--valid-days must be 1..{MAX_VALID_DAYS}, got {valid_days}",
                          key="valid_days")
    if out.exists():
        raise ConfigError(f"{out} exists; refusing to overwrite it", key="export")
    now = now or _utcnow()
    with _locked(repo_dir):
        meta = repo_dir / "metadata"
        cur = _load_current(meta)
        paths = sorted(p for p in cur.targets.signed.targets
                       if p.startswith(f"{model}/{version}/"))
        if not paths:
            raise ConfigError(f"{model} v{version} is not released in {repo_dir}",
                              key="version")
        lifetime = timedelta(days=valid_days)
        renew_targets = cur.targets.signed.expires < now + lifetime
        long_lived = replace(settings, timestamp_expiry_hours=valid_days * 24,
                             snapshot_expiry_days=valid_days,
                             targets_expiry_days=max(valid_days, settings.targets_expiry_days))
        signers = load_signers(Path(keys_dir), cur.root.signed,
                               (Targets.type, Snapshot.type, Timestamp.type))
        _commit(repo_dir, cur, signers, long_lived, now, new_targets=renew_targets,
                new_snapshot=True)
        members = _members(repo_dir, cur, paths)
        _write_tar(out, ReleaseIndex(model, version, time.time()), members)
    info = ExportInfo(out, model, version, tuple(paths), now + lifetime, out.stat().st_size)
    logger.info("exported %s v%d to %s (%d bytes, valid until %s)", model, version, out,
                info.size, info.expires.isoformat())
    return info


def _members(repo_dir: Path, cur, paths: list[str]) -> list[tuple[str, Path]]:
    """(name in the archive, file in the repository): roots, the current metadata, targets."""
    meta = repo_dir / "metadata"
    roots = [(f"metadata/{v}.root.json", meta / f"{v}.root.json")
             for v in range(1, cur.root.signed.version + 1)]
    current = [f"{cur.snapshot.signed.version}.snapshot.json",
               f"{cur.targets.signed.version}.targets.json", "timestamp.json"]
    files = roots + [(f"metadata/{n}", meta / n) for n in current]
    for path in paths:
        sha = cur.targets.signed.targets[path].hashes["sha256"]
        directory, name = path.rsplit("/", 1)
        files.append((f"targets/{directory}/{sha}.{name}",
                      repo_dir / "targets" / directory / f"{sha}.{name}"))
    return files


def _anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o644
    return info


def _write_tar(out: Path, index: ReleaseIndex, members: list[tuple[str, Path]]) -> None:
    """All or nothing: a temporary file next to ``out``, fsynced, then renamed."""
    tmp = out.with_name(f".{out.name}.partial")
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                data = index.to_bytes()
                info = tarfile.TarInfo(INDEX_NAME)
                info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
                tar.addfile(info, io.BytesIO(data))
                for name, path in members:
                    tar.add(path, arcname=name, recursive=False, filter=_anonymous)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
