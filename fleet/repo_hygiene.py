"""What keeps a release all-or-nothing besides its staging directory: removing what an
interrupted writer left in the repository, and refusing to sign with a clock that would
make the new metadata expire early (or be expired already) on every device. Call both only
under the repository's lock (``fleet.tuf_repo``)."""

from __future__ import annotations

import contextlib
import logging
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

from edgeship.fleet.bundle import BUNDLE_PREFIX
from edgeship.fleet.errors import RepositoryError

logger = logging.getLogger(__name__)

STAGING_PREFIX = ".staging-"  # a release's files, verified, before they are moved in
#: How far this host's clock may be behind the repository's last signature
CLOCK_SKEW_S = 300


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_leftovers(repo_dir: Path, released: set[tuple[str, str]],
                     committed: dict[str, int]) -> list[Path]:
    """Remove extracted bundles, staging directories and temp files, version directories
    no current target points at (``released``: (model, version) pairs), and metadata files
    newer than what the timestamp commits (``committed``: role -> version)."""
    found = [*repo_dir.glob(BUNDLE_PREFIX + "*"), *repo_dir.glob(STAGING_PREFIX + "*")]
    for p in (repo_dir / "metadata").iterdir():
        version, _, rest = p.name.partition(".")
        role = rest.removesuffix(".json")
        if p.name.startswith(".") or (version.isdigit() and role in committed
                                      and int(version) > committed[role]):
            found.append(p)
    for model_dir in (p for p in (repo_dir / "targets").iterdir() if p.is_dir()):
        for version_dir in model_dir.iterdir():
            if (model_dir.name, version_dir.name) not in released:
                found.append(version_dir)
            elif version_dir.is_dir():
                found += [p for p in version_dir.iterdir() if p.name.startswith(".")]
    for p in found:
        logger.warning("removing %s (left by an interrupted release)", p)
        remove_path(p)
    for model_dir in (p for p in (repo_dir / "targets").iterdir() if p.is_dir()):
        with contextlib.suppress(OSError):
            model_dir.rmdir()  # only when empty
    return found


def check_signing_time(timestamp_file: Path, now: datetime, expiries: dict[str, datetime],
                       period: timedelta) -> None:
    """Refuse to sign when ``now`` is behind the repository's last signature (the
    timestamp file's mtime, set by whichever host re-signed it last), or when a role's
    metadata (``expiries``: role -> when it will expire) ends within one timestamp
    ``period``: devices would refuse everything soon after."""
    last = datetime.fromtimestamp(timestamp_file.stat().st_mtime, timezone.utc) \
        .replace(microsecond=0)
    if now < last - timedelta(seconds=CLOCK_SKEW_S):
        raise RepositoryError(
            f"this host's clock says {now:%Y-%m-%d %H:%M} UTC but the repository was last "
            f"signed at {last:%Y-%m-%d %H:%M} UTC: metadata signed now would expire early "
            "or already be expired on devices; fix the clock (NTP) and release again")
    for role, expires in expiries.items():
        if expires <= now + period:
            raise RepositoryError(
                f"{role} metadata expires at {expires:%Y-%m-%d %H:%M} UTC, within the "
                f"timestamp period ({period}) of now ({now:%Y-%m-%d %H:%M} UTC): "
                + ("rotate root (keys rotate-root) first" if role == "root"
                   else f"raise {role}_expiry_days"))
