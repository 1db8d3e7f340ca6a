"""Model updates: TUF-verified download over MQTT, staging, health check, commit.

Drives the lifecycle in ``agent.lifecycle``; every step is persisted before it runs and
reported on the status topic. Any error rolls back: the staging area is removed and the
active model and the one being served stay exactly as they were.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tuf.api import exceptions as tuf_exc
from tuf.ngclient import FetcherInterface, Updater

from agent.errors import BundleError, EdgeshipError, Reason, TransferError, VerificationError
from agent.health import check_health
from agent.lifecycle import IN_FLIGHT, Event, RecordStore, State, UpdateRecord
from agent.manifest import MANIFEST_NAME, Manifest
from agent.runtime import load_runtime
from agent.selection import select_variant
from agent.serving import LoadedModel, ModelServer
from agent.store import InstalledModel, ModelStore

logger = logging.getLogger(__name__)

METADATA_URL = "mqtt://fleet/metadata/"
TARGETS_URL = "mqtt://fleet/targets/"
MAX_ATTEMPTS_PER_VERSION = 3

Report = Callable[..., None]  # report(event, *, model, version, reason=None, **extra)


@dataclass(frozen=True)
class DeviceTraits:
    arch: str
    runtimes: tuple[str, ...]
    preferred_precisions: tuple[str, ...]
    threads: int
    providers: tuple[str, ...]
    latency_budget_ms: float | None = None


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


class UpdateManager:
    def __init__(self, *, tuf_dir: Path, downloads_dir: Path, store: ModelStore,
                 records: RecordStore, server: ModelServer, fetcher: FetcherInterface,
                 traits: DeviceTraits, report: Report, max_model_bytes: int) -> None:
        self.tuf_dir = tuf_dir
        self.downloads_dir = downloads_dir
        self.store = store
        self.records = records
        self.server = server
        self.fetcher = fetcher
        self.traits = traits
        self.report = report
        self.max_model_bytes = max_model_bytes
        self._attempts: dict[tuple[str, int], int] = {}

    # --- start-up -----------------------------------------------------------------------

    def recover(self) -> None:
        """After a restart: roll back any update that was in flight, clean leftovers."""
        for path in self.store.clean_leftovers():
            logger.info("removed leftover %s", path)
        shutil.rmtree(self.downloads_dir, ignore_errors=True)
        self.downloads_dir.mkdir(parents=True, exist_ok=True)
        for record in self.records.all():
            if record.state in IN_FLIGHT:
                self._finish_rollback(record, Reason.INTERRUPTED,
                                      f"agent restarted in state {record.state}")

    def load_active(self) -> list[InstalledModel]:
        """Serve every committed model from disk: works with no network at all."""
        loaded = []
        for name in self.store.models():
            try:
                installed = self.store.active(name)
                if installed is None:
                    continue
                self.server.swap(LoadedModel(installed, self._load(installed)))
                loaded.append(installed)
            except EdgeshipError as e:
                logger.error("cannot serve committed model %s: %s", name, e)
        return loaded

    # --- one update -----------------------------------------------------------------------

    def handle_announcement(self, model: str, version: int) -> None:
        active = self.store.active(model)
        if active is not None and version <= active.version:
            if version < active.version:
                self.report("rejected", model=model, version=version,
                            reason=Reason.STALE_ANNOUNCEMENT.value,
                            detail=f"v{active.version} is installed")
            return
        attempts = self._attempts.get((model, version), 0)
        if attempts >= MAX_ATTEMPTS_PER_VERSION:
            logger.info("not retrying %s v%s after %d attempts", model, version, attempts)
            return
        self._attempts[(model, version)] = attempts + 1
        self.install(model, version)

    def install(self, model: str, version: int) -> bool:
        record = self.records.load(model)
        if record.state in (State.COMMITTED, State.FAILED):
            record = self._step(record, Event.DONE)
        record = self._save(record.begin(version))
        self.report("downloading", model=model, version=version)
        staging = self.store.staging_dir(model, version)
        try:
            manifest, variant_id = self._download(model, version, staging)
            record = self._step(record, Event.DOWNLOADED)
            variant = self._verify(manifest, variant_id, staging)
            record = self._step(record, Event.VERIFIED)
            installed = self.store.finalize(model, version, staging, manifest, variant)
            record = self._step(record, Event.CHECK)
            loaded = self._health_check(installed)
            record = self._step(record, Event.HEALTHY)
            self._commit(loaded)
            self._step(record, Event.DONE)
            return True
        except EdgeshipError as e:
            self._rollback(record, e.reason_code, str(e), staging)
            return False
        except Exception as e:  # a bug must not leave a half-installed model behind
            logger.exception("unexpected error during update")
            self._rollback(record, Reason.INTERNAL, f"{type(e).__name__}: {e}", staging)
            return False

    def _step(self, record: UpdateRecord, event: Event) -> UpdateRecord:
        new = self._save(record.advance(event))
        if new.state not in (State.IDLE, State.DOWNLOADING):
            self.report(new.state.value, model=new.model, version=new.version)
        return new

    def _save(self, record: UpdateRecord) -> UpdateRecord:
        self.records.save(record)
        return record

    def _new_updater(self) -> Updater:
        return Updater(metadata_dir=str(self.tuf_dir), metadata_base_url=METADATA_URL,
                       target_base_url=TARGETS_URL, fetcher=self.fetcher, bootstrap=None)

    def _download(self, model: str, version: int, staging: Path) -> tuple[Manifest, str]:
        try:
            updater = self._new_updater()
            updater.refresh()
            manifest = Manifest.from_bytes(self._fetch_target(
                updater, f"{model}/{version}/{MANIFEST_NAME}", staging).read_bytes())
            if manifest.model != model or manifest.version != version:
                raise VerificationError(
                    f"manifest says {manifest.model} v{manifest.version}, expected "
                    f"{model} v{version}", reason_code=Reason.METADATA_INVALID)
            t = self.traits
            variant = select_variant(manifest, t.preferred_precisions, t.runtimes, t.arch)
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
        dest = staging / target.rsplit("/", 1)[1]
        tmp = self.downloads_dir / f"{dest.name}.part"
        updater.download_target(info, filepath=str(tmp))
        tmp.replace(dest)
        return dest

    def _verify(self, manifest: Manifest, variant_id: str, staging: Path):
        variant = manifest.variant(variant_id)
        for name, size, sha in ((variant.file, variant.size, variant.sha256),
                                (manifest.golden_file, manifest.golden_size,
                                 manifest.golden_sha256)):
            path = staging / name
            if path.stat().st_size != size:
                raise BundleError(f"{name}: size differs from the manifest",
                                  reason_code=Reason.LENGTH_MISMATCH)
            if _sha256(path) != sha:
                raise BundleError(f"{name}: sha256 differs from the manifest",
                                  reason_code=Reason.HASH_MISMATCH)
        return variant

    def _load(self, installed: InstalledModel):
        return load_runtime(installed.variant.runtime, installed.model_path,
                            threads=self.traits.threads, providers=self.traits.providers)

    def _health_check(self, installed: InstalledModel) -> LoadedModel:
        runtime = self._load(installed)
        report = check_health(runtime, installed.manifest, installed.variant,
                              installed.golden_path,
                              latency_budget_ms=self.traits.latency_budget_ms)
        logger.info("%s v%s healthy: max_abs_diff=%.3g", installed.model, installed.version,
                    report.max_abs_diff)
        return LoadedModel(installed, runtime)

    def _commit(self, loaded: LoadedModel) -> None:
        inst = loaded.installed
        self.store.activate(inst.model, inst.version)
        self.server.swap(loaded)
        self.store.prune(inst.model)
        self.report("serving", model=inst.model, version=inst.version,
                    variant=inst.variant.id, precision=inst.variant.precision)

    # --- rollback -------------------------------------------------------------------------

    def _rollback(self, record: UpdateRecord, reason: Reason, detail: str,
                  staging: Path) -> None:
        logger.warning("update %s v%s failed (%s): %s", record.model, record.version,
                       reason, detail)
        record = self._save(record.advance(Event.ERROR, reason=reason.value))
        shutil.rmtree(staging, ignore_errors=True)
        self._remove_inactive(record.model, record.version)
        for part in self.downloads_dir.glob("*.part"):
            part.unlink(missing_ok=True)
        self._finish_rollback(record, reason, detail)

    def _remove_inactive(self, model: str, version: int) -> None:
        active = self.store.active(model)
        if active is None or active.version != version:
            shutil.rmtree(self.store.root / model / str(version), ignore_errors=True)

    def _finish_rollback(self, record: UpdateRecord, reason: Reason, detail: str) -> None:
        if record.state != State.ROLLING_BACK:
            record = self._save(record.advance(Event.ERROR, reason=reason.value))
        record = self._save(record.advance(Event.ROLLED_BACK))
        self.report("failed", model=record.model, version=record.version,
                    reason=reason.value, detail=detail[:500])
        active = self.store.active(record.model)
        self._save(record.advance(Event.DONE))
        if active is not None:
            logger.info("still serving %s v%s", active.model, active.version)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
