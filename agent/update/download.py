"""The download side of an update: TUF-verified download into staging, then checks of the
staged files against the signed manifest. The install driver (``agent.update.driver``)
calls it in its ``downloading`` and ``verifying`` states; any error it raises rolls back."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tuf.api import exceptions as tuf_exc

from edgeship.agent.errors import BundleError, EdgeshipError, Reason, TransferError, VerificationError
from edgeship.agent.manifest import MANIFEST_NAME, Manifest, Variant
from edgeship.agent.protocol import StatusEvent
from edgeship.agent.selection import select_variant
from edgeship.agent.store import ModelStore
from edgeship.agent.trust import VersionFloor, check_target
from edgeship.agent.update.settings import DeviceTraits
from edgeship.agent.update.transfer import RESUME_SUFFIX, discard_all_resume, resume_target
from edgeship.common.fsutil import sha256_file

if TYPE_CHECKING:  # tuf.ngclient (+ securesystemslib signers, cryptography: ~11 MB of RSS)
    from tuf.api.metadata import TargetFile
    from tuf.ngclient import Updater  # is imported when an update runs (_new_updater)

    from edgeship.agent.archive import ReleaseArchive  # tarfile: once an archive is offered
    from edgeship.agent.update.fetcher_base import FetcherInterface

logger = logging.getLogger(__name__)

MQTT_BASE_URL = "mqtt://fleet/"  # the fleet server over MQTT (agent/transfer.py)
METADATA_URL = MQTT_BASE_URL + "metadata/"
TARGETS_URL = MQTT_BASE_URL + "targets/"


class Report(Protocol):
    def __call__(self, event: StatusEvent, **fields: Any) -> None: ...


def tuf_reason(e: Exception) -> Reason:
    """Map python-tuf's exceptions to our stable reason codes."""
    if isinstance(e, tuf_exc.LengthOrHashMismatchError) and "length" in str(e).lower():
        return Reason.LENGTH_MISMATCH
    table = [(tuf_exc.UnsignedMetadataError, Reason.BAD_SIGNATURE),
             (tuf_exc.BadVersionNumberError, Reason.ROLLBACK),
             (tuf_exc.ExpiredMetadataError, Reason.METADATA_EXPIRED),
             (tuf_exc.LengthOrHashMismatchError, Reason.HASH_MISMATCH),
             (tuf_exc.DownloadLengthMismatchError, Reason.LENGTH_MISMATCH),
             (tuf_exc.RepositoryError, Reason.METADATA_INVALID)]
    for cls, reason in table:
        if isinstance(e, cls):
            return reason
    if isinstance(e, tuf_exc.DownloadHTTPError) and e.status_code == 404:
        return Reason.NOT_FOUND
    cause = e.__cause__
    if isinstance(cause, TransferError):
        return cause.reason_code
    return Reason.TRANSFER_FAILED


def _close(archive: ReleaseArchive, remove: bool) -> None:
    archive.close()
    if remove:
        archive.path.unlink(missing_ok=True)


class Downloader:
    """The download side of an update: TUF-verified metadata and targets (over MQTT or
    HTTP, resumable, by delta when one is signed), the anti-rollback floor, and checks of
    the staged files against the manifest. Raises; never touches the update record."""

    def __init__(self, *, tuf_dir: Path, downloads_dir: Path, store: ModelStore,
                 fetcher: FetcherInterface, traits: DeviceTraits, report: Report,
                 max_model_bytes: int, base_url: str = MQTT_BASE_URL) -> None:
        self.tuf_dir = tuf_dir
        self.base_url = base_url.rstrip("/") + "/"  # mqtt://fleet/ or http(s)://
        self.downloads_dir = downloads_dir
        self.store = store
        self.fetcher = fetcher
        self.traits = traits
        self.report = report
        self.max_model_bytes = max_model_bytes
        #: (model, version) -> a signed release archive to read instead of the network
        self._offered: dict[tuple[str, int], tuple[ReleaseArchive, bool]] = {}

    def offer(self, archive: ReleaseArchive, *, remove_after: bool = False) -> None:
        """The next download of the archive's model version reads it from ``archive``
        (``edgeship agent install FILE``) through the same TUF client and checks; the
        archive is closed (``remove_after``: and its file deleted) when that download ends."""
        key = (archive.index.model, archive.index.version)
        old = self._offered.pop(key, None)
        self._offered[key] = (archive, remove_after)
        if old is not None:
            _close(*old)

    def clean_downloads(self) -> None:
        """Scratch files of the download side (called on start and after a rollback)."""
        # partial target files (*.resume) survive a restart so the download resumes
        # where it stopped; everything else in downloads_dir is scratch.
        self.downloads_dir.mkdir(parents=True, exist_ok=True)
        for path in self.downloads_dir.iterdir():
            if not path.name.endswith(RESUME_SUFFIX):
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)

    def prune_resume(self, served: dict[str, int],
                     drop: tuple[tuple[str, int], ...] = ()) -> list[Path]:
        """Remove partial downloads nobody will resume: those of a version in ``drop`` and
        those of a version at or below the one its model serves (``served``)."""
        removed = []
        for part in self.downloads_dir.glob("*" + RESUME_SUFFIX):
            target = resume_target(part)
            if target is not None and (target in drop or
                                       target[1] <= served.get(target[0], 0)):
                part.unlink(missing_ok=True)
                removed.append(part)
                logger.info("removed the partial download %s", part.name)
        return removed

    def confirm(self, wanted: list[tuple[str, int]]) -> set[tuple[str, int]]:
        """Which of ``wanted`` (model, version) the signed metadata lists: one refresh for
        all of them, nothing written but TUF's own metadata."""
        try:
            updater = self._new_updater()
            updater.refresh()
            return {(m, v) for m, v in wanted
                    if updater.get_targetinfo(f"{m}/{v}/{MANIFEST_NAME}") is not None}
        except (tuf_exc.RepositoryError, tuf_exc.DownloadError) as e:
            raise VerificationError(f"{type(e).__name__}: {e}",
                                    reason_code=tuf_reason(e)) from e

    def _new_updater(self, archive: ReleaseArchive | None = None) -> Updater:
        from tuf.ngclient import Updater  # lazily: see the imports
        fetcher: FetcherInterface = self.fetcher
        base = self.base_url
        if archive is not None:
            from edgeship.agent.archive import ARCHIVE_URL
            base, fetcher = ARCHIVE_URL, archive.fetcher()
        return Updater(metadata_dir=str(self.tuf_dir),
                       metadata_base_url=base + "metadata/",
                       target_base_url=base + "targets/",
                       fetcher=fetcher,  # type: ignore[arg-type]  # same contract
                       bootstrap=None)

    # --- trust checks, resume, deltas, stale metadata -----------------------------------

    @property
    def version_floor(self) -> VersionFloor:
        return VersionFloor(self.tuf_dir.parent / "version_floor.json")

    def _hardware_classes(self) -> tuple[str, ...]:
        return self.traits.hardware_classes or (self.traits.arch,)

    def _check_floor(self, model: str, version: int) -> None:
        """Never below the highest version ever installed (persisted across restarts)."""
        floor = self.version_floor
        active = self.store.active(model)
        if active is not None:
            floor.raise_to(model, active.version)
        floor.check(model, version)

    def _refresh(self, model: str, version: int,
                 archive: ReleaseArchive | None = None) -> Updater:
        updater = self._new_updater(archive)
        try:
            updater.refresh()
        except tuf_exc.ExpiredMetadataError as e:
            self.report(StatusEvent.METADATA_STALE, model=model, version=version,
                        reason=Reason.METADATA_EXPIRED.value, detail=str(e)[:300])
            raise
        return updater

    def download(self, model: str, version: int, staging: Path) -> tuple[Manifest, str]:
        offered = self._offered.pop((model, version), None)
        try:
            return self._download(model, version, staging,
                                  offered[0] if offered is not None else None)
        finally:
            if offered is not None:
                _close(*offered)

    def _download(self, model: str, version: int, staging: Path,
                  archive: ReleaseArchive | None) -> tuple[Manifest, str]:
        try:
            self._check_floor(model, version)
            updater = self._refresh(model, version, archive)
            manifest = Manifest.from_bytes(self._fetch_target(
                updater, f"{model}/{version}/{MANIFEST_NAME}", staging).read_bytes())
            if manifest.model != model or manifest.version != version:
                raise VerificationError(
                    f"manifest says {manifest.model} v{manifest.version}, expected "
                    f"{model} v{version}", reason_code=Reason.METADATA_INVALID)
            t = self.traits
            variant = select_variant(manifest, t.preferred_precisions, t.runtimes, t.arch,
                                     t.memory_budget_mb,
                                     use_measurements=t.use_measurements)
            for name in (variant.file, manifest.golden_file):
                self._fetch_target(updater, f"{model}/{version}/{name}", staging)
            return manifest, variant.id
        except (tuf_exc.RepositoryError, tuf_exc.DownloadError) as e:
            raise VerificationError(f"{type(e).__name__}: {e}",
                                    reason_code=tuf_reason(e)) from e
        except OSError as e:
            raise EdgeshipError(f"cannot write download: {e}",
                                reason_code=Reason.INSTALL_FAILED) from e

    def _fetch_target(self, updater: Updater, target: str, staging: Path) -> Path:
        info = updater.get_targetinfo(target)
        if info is None:
            raise VerificationError(f"target {target} is not in the signed metadata",
                                    reason_code=Reason.NOT_FOUND)
        if info.length > self.max_model_bytes:
            raise BundleError(f"target {target} is {info.length} bytes, over the cap of "
                              f"{self.max_model_bytes}")
        model, version = target.split("/")[:2]
        check_target(info, model, int(version), self._hardware_classes())
        dest = staging / target.rsplit("/", 1)[1]
        if self._fetch_by_delta(updater, info, model, int(version), dest):
            return dest
        tmp = self.downloads_dir / f"{dest.name}.part"
        try:
            updater.download_target(info, filepath=str(tmp))
        except (tuf_exc.RepositoryError, tuf_exc.DownloadLengthMismatchError):
            discard_all_resume(self.downloads_dir)  # verified bad: never resume from it
            raise
        tmp.replace(dest)
        return dest

    def _fetch_by_delta(self, updater: Updater, info: TargetFile, model: str, version: int,
                        dest: Path) -> bool:
        """Rebuild ``dest`` from the installed model and a signed delta; False (after
        reporting why, when a delta was tried) means: download the full file."""
        active = self.store.active(model)
        if active is None or active.variant.file != dest.name or not \
                active.model_path.is_file():
            return False
        delta_info = updater.get_targetinfo(f"{info.path}.from-{active.version}.delta")
        if delta_info is None or delta_info.length > self.max_model_bytes:
            return False
        delta = self.downloads_dir / f"{dest.name}.delta.part"
        rebuilt = self.downloads_dir / f"{dest.name}.rebuilt.part"
        try:
            check_target(delta_info, model, version, self._hardware_classes())
            updater.download_target(delta_info, filepath=str(delta))
            from edgeship.agent.delta import apply_delta  # zstandard only when a delta is used
            apply_delta(delta, active.model_path, rebuilt, max_bytes=info.length)
            # the rebuilt file must be exactly the signed full target
            with open(rebuilt, "rb") as f:
                info.verify_length_and_hashes(f)
        except (EdgeshipError, tuf_exc.RepositoryError, tuf_exc.DownloadError, OSError) as e:
            reason = e.reason_code if isinstance(e, EdgeshipError) else Reason.DELTA_MISMATCH
            logger.warning("delta for %s rejected (%s): %s; downloading the full file",
                           info.path, reason, e)
            self.report(StatusEvent.DELTA_REJECTED, model=model, version=version,
                        reason=reason.value, detail=str(e)[:300])
            rebuilt.unlink(missing_ok=True)
            return False
        finally:
            delta.unlink(missing_ok=True)
        rebuilt.replace(dest)
        logger.info("rebuilt %s from v%d and a %d-byte delta", info.path, active.version,
                    delta_info.length)
        return True

    def verify_staged(self, manifest: Manifest, variant_id: str, staging: Path) -> Variant:
        variant = manifest.variant(variant_id)
        for name, size, sha in ((variant.file, variant.size, variant.sha256),
                                (manifest.golden_file, manifest.golden_size,
                                 manifest.golden_sha256)):
            path = staging / name
            if path.stat().st_size != size:
                raise BundleError(f"{name}: size differs from the manifest",
                                  reason_code=Reason.LENGTH_MISMATCH)
            if sha256_file(path) != sha:
                raise BundleError(f"{name}: sha256 differs from the manifest",
                                  reason_code=Reason.HASH_MISMATCH)
        return variant
