"""A TUF repository on disk (consistent snapshots), signed with ed25519 keys from files.

Layout (``repo_dir``)::

    metadata/1.root.json  metadata/root.json      (root.json: copy of the newest root)
    metadata/N.targets.json  metadata/N.snapshot.json  metadata/timestamp.json
    targets/{model}/{version}/{sha256}.{file}      (target path {model}/{version}/{file})

Keys (``keys_dir``, mode 0700; :mod:`fleet.tuf_keys`): ``targets.pem``, ``snapshot.pem``, ``timestamp.pem`` (the
online keys) and ``root-1.pem`` … ``root-K.pem`` — or, with ``root_keys_dir``, the root keys
live in a separate directory that can stay offline (only ``keys init`` and ``rotate_root``
need it). PKCS#8 PEM, mode 0600. Timestamp metadata is short-lived (hours): the fleet server
re-signs it with the online timestamp key, so a device notices a frozen feed.

Writes happen in dependency order — target files, targets, snapshot, and last the
timestamp, which is the commit point — so a reader never sees metadata that points at
missing files. One writer at a time (an ``flock`` on ``repo_dir/.lock``).

A release is all-or-nothing: every file is verified into a hidden staging directory, which
becomes ``targets/{model}/{version}`` in one rename just before the metadata is signed; any
failure removes what it wrote. What a killed release leaves (extracted bundles, staging
directories, unreferenced version directories, metadata never committed by a timestamp) is
removed by the next writer under the lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

from tuf.api.exceptions import RepositoryError as TufRepositoryError
from tuf.api.metadata import (Metadata, MetaFile, Root, Snapshot, TargetFile, Targets,
                              Timestamp)
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from edgeship.agent.errors import ConfigError
from edgeship.fleet.bundle import (BundleFile, BundleLimits, LoadedBundle, install_file,
                                   open_bundle, with_manifest)
from edgeship.fleet.errors import ReleaseRejectedError, RepositoryError
from edgeship.fleet.files import atomic_write, fsync_dir
from edgeship.fleet.repo_hygiene import (STAGING_PREFIX, check_signing_time, remove_leftovers,
                                         remove_path)
from edgeship.fleet.tuf_keys import (ROLES, empty_keys_dir, generate_keys, generate_root_keys,
                                     load_signers)

logger = logging.getLogger(__name__)

CUSTOM_KEY = "edgeship"
_SERIALIZER = JSONSerializer(compact=False)


@dataclass(frozen=True)
class RepoSettings:
    root_threshold: int = 1
    root_keys: int = 0  # root keys to generate; 0 = exactly root_threshold
    root_expiry_days: int = 365
    targets_expiry_days: int = 90
    snapshot_expiry_days: int = 7
    timestamp_expiry_hours: int = 6
    max_bundle_bytes: int = 4 * 1024**3
    max_bundle_files: int = 64
    deltas: bool = False  # release: also publish deltas from the previous version
    latency_budget_ms: float | None = None  # release: the release's own latency budget
    # release: profile name -> model_memory_budget_mb a language model must fit (refused
    # before signing when no variant fits one of them)
    memory_budgets: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        for key in ("root_threshold", "root_expiry_days", "targets_expiry_days",
                    "snapshot_expiry_days", "timestamp_expiry_hours", "max_bundle_bytes",
                    "max_bundle_files"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{key} must be a positive integer, got {value!r}", key=key)
        budget = self.latency_budget_ms
        if budget is not None and not 0 < budget <= 3_600_000:
            raise ConfigError(f"latency_budget_ms must be > 0, got {budget!r}",
                              key="latency_budget_ms")
        if self.root_keys and self.root_keys < self.root_threshold:
            raise ConfigError(f"root_keys ({self.root_keys}) must be >= root_threshold "
                              f"({self.root_threshold})", key="root_keys")

    @property
    def root_key_count(self) -> int:
        return self.root_keys or self.root_threshold

    def lifetime(self, role: str) -> timedelta:
        if role == Timestamp.type:
            return timedelta(hours=self.timestamp_expiry_hours)
        return timedelta(days=getattr(self, f"{role}_expiry_days"))


@dataclass(frozen=True)
class ReleaseInfo:
    model: str
    version: int
    targets: tuple[str, ...]  # TUF target paths, manifest first
    released_at: float  # unix seconds


def _utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


# --- metadata I/O ----------------------------------------------------------------------------

def _sign(md: Metadata, signers: list) -> None:
    md.signatures.clear()
    for signer in signers:
        md.sign(signer, append=True)


def _write(path: Path, md: Metadata) -> bytes:
    data = md.to_bytes(_SERIALIZER)
    atomic_write(path, data)
    return data


def _meta_file(version: int, data: bytes) -> MetaFile:
    return MetaFile(version=version, length=len(data),
                    hashes={"sha256": hashlib.sha256(data).hexdigest()})


def _read(path: Path, cls: type) -> Metadata:
    try:
        md = Metadata.from_bytes(path.read_bytes())
    except FileNotFoundError as e:
        raise RepositoryError(f"repository metadata {path} is missing") from e
    except (DeserializationError, OSError) as e:
        raise RepositoryError(f"cannot read repository metadata {path}: {e}") from e
    if not isinstance(md.signed, cls):
        raise RepositoryError(f"{path} is not {cls.type} metadata")
    return md


@dataclass
class _Current:
    root: Metadata
    targets: Metadata
    snapshot: Metadata
    timestamp: Metadata


def _load_current(meta_dir: Path) -> _Current:
    root = _read(meta_dir / "root.json", Root)
    timestamp = _read(meta_dir / "timestamp.json", Timestamp)
    snap_v = timestamp.signed.snapshot_meta.version
    snapshot = _read(meta_dir / f"{snap_v}.snapshot.json", Snapshot)
    targets_v = snapshot.signed.meta["targets.json"].version
    targets = _read(meta_dir / f"{targets_v}.targets.json", Targets)
    return _Current(root, targets, snapshot, timestamp)


@contextlib.contextmanager
def _locked(repo_dir: Path) -> Iterator[None]:
    if not (repo_dir / "metadata").is_dir():
        raise ConfigError(f"{repo_dir} is not an edgeship repository (no metadata/; "
                          "'edgeship keys init' makes one)", key="repo")
    with open(repo_dir / ".lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _bump(md: Metadata, lifetime: timedelta, now: datetime, bump: bool) -> None:
    md.signed.version += 1 if bump else 0
    md.signed.expires = now + lifetime


def _commit(repo_dir: Path, cur: _Current, signers: dict[str, list], settings: RepoSettings,
            now: datetime, *, new_targets: bool, new_snapshot: bool,
            bump: bool = True) -> None:
    """Re-sign and write targets (optional) → snapshot (optional) → timestamp."""
    meta_dir = repo_dir / "metadata"
    if new_targets:
        _bump(cur.targets, settings.lifetime(Targets.type), now, bump)
        _sign(cur.targets, signers[Targets.type])
        data = _write(meta_dir / f"{cur.targets.signed.version}.targets.json", cur.targets)
        cur.snapshot.signed.meta["targets.json"] = _meta_file(cur.targets.signed.version, data)
    if new_targets or new_snapshot:
        _bump(cur.snapshot, settings.lifetime(Snapshot.type), now, bump)
        _sign(cur.snapshot, signers[Snapshot.type])
        data = _write(meta_dir / f"{cur.snapshot.signed.version}.snapshot.json", cur.snapshot)
        cur.timestamp.signed.snapshot_meta = _meta_file(cur.snapshot.signed.version, data)
    _bump(cur.timestamp, settings.lifetime(Timestamp.type), now, bump)
    _sign(cur.timestamp, signers[Timestamp.type])
    _write(meta_dir / "timestamp.json", cur.timestamp)


# --- public API ---------------------------------------------------------------------------

def init_repository(keys_dir: Path, repo_dir: Path, settings: RepoSettings = RepoSettings(),
                    *, now: datetime | None = None, root_keys_dir: Path | None = None) -> None:
    """Generate keys and write version-1 metadata. Refuses to touch an existing repo.
    ``root_keys_dir`` (default: ``keys_dir``) receives the root keys: keep it offline."""
    keys_dir, repo_dir = Path(keys_dir), Path(repo_dir)
    root_keys_dir = Path(root_keys_dir) if root_keys_dir else keys_dir
    meta_dir = repo_dir / "metadata"
    if meta_dir.exists() and any(meta_dir.iterdir()):
        raise RepositoryError(f"{repo_dir} already holds a repository; refusing to overwrite")
    now = now or _utcnow()
    signers = generate_keys(keys_dir, root_keys_dir, settings.root_key_count)
    meta_dir.mkdir(parents=True, exist_ok=True)
    (repo_dir / "targets").mkdir(exist_ok=True)

    root = Root(expires=now + timedelta(days=settings.root_expiry_days),
                consistent_snapshot=True)
    for role in ROLES:
        for signer in signers[role]:
            root.add_key(signer.public_key, role)
    root.roles[Root.type].threshold = settings.root_threshold
    root_md = Metadata(root)
    _sign(root_md, signers[Root.type])
    _write(meta_dir / "1.root.json", root_md)
    _write(meta_dir / "root.json", root_md)

    cur = _Current(root_md, Metadata(Targets()), Metadata(Snapshot()), Metadata(Timestamp()))
    _commit(repo_dir, cur, signers, settings, now, new_targets=True, new_snapshot=True,
            bump=False)
    logger.info("initialised TUF repository %s (keys in %s)", repo_dir, keys_dir)


def released_versions(repo_dir: Path) -> dict[str, int]:
    """Newest released version per model, from the current targets metadata."""
    cur = _load_current(Path(repo_dir) / "metadata")
    return _latest_versions(cur.targets.signed)


def _latest_versions(targets: Targets) -> dict[str, int]:
    latest: dict[str, int] = {}
    for info in targets.targets.values():
        custom = (info.unrecognized_fields.get("custom") or {}).get(CUSTOM_KEY) or {}
        model, version = custom.get("model"), custom.get("version")
        if isinstance(model, str) and isinstance(version, int):
            latest[model] = max(version, latest.get(model, 0))
    return latest


def _custom(manifest_model: str, version: int, f: BundleFile) -> dict:
    custom: dict = {"model": manifest_model, "version": version, "kind": f.kind}
    if f.variant is not None:
        custom.update(variant=f.variant.id, runtime=f.variant.runtime,
                      precision=f.variant.precision, hardware=list(f.variant.hardware))
    return {CUSTOM_KEY: custom}


def _add_targets(dest_dir: Path, bundle: LoadedBundle, targets: Targets) -> tuple[str, ...]:
    m = bundle.manifest
    paths = []
    for f in bundle.files:
        install_file(bundle.source(f), f, dest_dir)
        path = f"{m.model}/{m.version}/{f.name}"
        targets.targets[path] = TargetFile(
            length=f.size, hashes={"sha256": f.sha256}, path=path,
            unrecognized_fields={"custom": _custom(m.model, m.version, f)})
        paths.append(path)
    return tuple(paths)


def delta_target_path(target: str, base_version: int) -> str:
    return f"{target}.from-{base_version}.delta"


def _add_deltas(repo_dir: Path, dest_dir: Path, bundle: LoadedBundle, targets: Targets,
                base_version: int) -> tuple[str, ...]:
    """For every variant file that also exists in ``base_version``, a delta target (when it
    is clearly smaller than the file), written to ``dest_dir``. The delta's own target pins
    its bytes; the rebuilt file is pinned by the full file's target."""
    from edgeship.fleet.delta import make_delta
    m = bundle.manifest
    added = []
    for f in bundle.files:
        base = targets.targets.get(f"{m.model}/{base_version}/{f.name}")
        if f.kind != "variant" or base is None:
            continue
        base_file = (repo_dir / "targets" / m.model / str(base_version) /
                     f"{base.hashes['sha256']}.{f.name}")
        delta = make_delta(base_file, bundle.directory / f.name)
        if len(delta) > 0.8 * f.size:
            continue
        path = delta_target_path(f"{m.model}/{m.version}/{f.name}", base_version)
        sha = hashlib.sha256(delta).hexdigest()
        atomic_write(dest_dir / f"{sha}.{path.rsplit('/', 1)[1]}", delta)
        targets.targets[path] = TargetFile(
            length=len(delta), hashes={"sha256": sha}, path=path,
            unrecognized_fields={"custom": {CUSTOM_KEY: {
                "model": m.model, "version": m.version, "kind": "delta",
                "base_version": base_version, "base_sha256": base.hashes["sha256"],
                "target": f"{m.model}/{m.version}/{f.name}"}}})
        added.append(path)
        logger.info("delta %s: %d bytes (full file %d)", path, len(delta), f.size)
    return tuple(added)


# --- all-or-nothing (the checks and the clean-up live in fleet.repo_hygiene) -------------

def _check_signing_time(repo_dir: Path, cur: _Current, settings: RepoSettings,
                        now: datetime) -> None:
    expiries = {Root.type: cur.root.signed.expires,
                **{role: now + settings.lifetime(role) for role in ROLES[1:3]}}
    check_signing_time(repo_dir / "metadata" / "timestamp.json", now, expiries,
                       settings.lifetime(Timestamp.type))


def _remove_leftovers(repo_dir: Path, cur: _Current) -> list[Path]:
    released = {tuple(path.split("/")[:2]) for path in cur.targets.signed.targets}
    return remove_leftovers(repo_dir, released,  # type: ignore[arg-type]
                            {Targets.type: cur.targets.signed.version,
                             Snapshot.type: cur.snapshot.signed.version})


def _stage(repo_dir: Path, bundle: LoadedBundle, targets: Targets,
           settings: RepoSettings, latest: int) -> tuple[Path, tuple[str, ...]]:
    """Copy and verify every file (and delta) into a staging directory; nothing is visible
    yet. Returns the directory and the new target paths."""
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=repo_dir))
    try:
        paths = _add_targets(staging, bundle, targets)
        if settings.deltas and latest:
            paths += _add_deltas(repo_dir, staging, bundle, targets, latest)
        staging.chmod(0o755)
        fsync_dir(staging)
    except BaseException:
        remove_path(staging)
        raise
    return staging, paths


def _publish(repo_dir: Path, staging: Path, cur: _Current, signers: dict[str, list],
             settings: RepoSettings, now: datetime, dest: Path) -> None:
    """Move the staged files to ``dest`` and sign. On any failure before the timestamp is
    written, the files and the new targets/snapshot metadata are removed again."""
    meta_dir = repo_dir / "metadata"
    written = [meta_dir / f"{cur.targets.signed.version + 1}.targets.json",
               meta_dir / f"{cur.snapshot.signed.version + 1}.snapshot.json"]
    old_timestamp = (meta_dir / "timestamp.json").read_bytes()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staging, dest)
        fsync_dir(dest.parent)
        _commit(repo_dir, cur, signers, settings, now, new_targets=True, new_snapshot=True)
    except BaseException:
        try:
            committed = (meta_dir / "timestamp.json").read_bytes() != old_timestamp
        except OSError:
            committed = True  # unknown: leave it to the next writer's remove_leftovers
        if not committed:
            for p in (staging, dest, *written):
                remove_path(p)
            with contextlib.suppress(OSError):
                dest.parent.rmdir()
        raise


def release_bundle(bundle_path: Path, repo_dir: Path, keys_dir: Path,
                   settings: RepoSettings = RepoSettings(), *,
                   now: datetime | None = None) -> ReleaseInfo:
    """Verify a bundle, add its files as targets and publish new signed metadata — all of
    it or nothing."""
    repo_dir = Path(repo_dir)
    now = now or _utcnow()
    limits = BundleLimits(settings.max_bundle_bytes, settings.max_bundle_files)
    with _locked(repo_dir):
        cur = _load_current(repo_dir / "metadata")
        _remove_leftovers(repo_dir, cur)
        _check_signing_time(repo_dir, cur, settings, now)
        with contextlib.ExitStack() as stack:
            bundle = stack.enter_context(open_bundle(Path(bundle_path), repo_dir, limits))
            if settings.latency_budget_ms is not None:  # a staging dir: cleaned after a kill
                tmp = stack.enter_context(tempfile.TemporaryDirectory(
                    dir=repo_dir, prefix=STAGING_PREFIX + "manifest-"))
                bundle = with_manifest(bundle, dataclasses.replace(
                    bundle.manifest, latency_budget_ms=settings.latency_budget_ms), Path(tmp))
            m = bundle.manifest
            latest = _latest_versions(cur.targets.signed).get(m.model, 0)
            if m.version <= latest:
                raise ReleaseRejectedError(
                    f"{m.model} v{m.version} is not newer than released v{latest}",
                    model=m.model, version=m.version, latest=latest)
            if m.llm is not None and settings.memory_budgets:
                from edgeship.fleet.llm_release import check_release
                check_release(m, dict(settings.memory_budgets))
            signers = load_signers(Path(keys_dir), cur.root.signed,
                                   (Targets.type, Snapshot.type, Timestamp.type))
            staging, paths = _stage(repo_dir, bundle, cur.targets.signed, settings, latest)
            _publish(repo_dir, staging, cur, signers, settings, now,
                     repo_dir / "targets" / m.model / str(m.version))
    logger.info("released %s v%d (%d targets)", m.model, m.version, len(paths))
    return ReleaseInfo(m.model, m.version, paths, time.time())


def online_signer(repo_dir: Path, keys_dir: Path, role: str = Timestamp.type):
    """The first key of an online ``role`` in ``keys_dir``, checked against the current
    root (the fleet server signs desired states with the timestamp key)."""
    root = _read(Path(repo_dir) / "metadata" / "root.json", Root)
    return load_signers(Path(keys_dir), root.signed, (role,))[role][0]


def refresh_timestamp(repo_dir: Path, keys_dir: Path, settings: RepoSettings = RepoSettings(),
                      *, now: datetime | None = None) -> int:
    """Re-sign timestamp with a fresh expiry; also renew snapshot and targets when less than
    half of their lifetime is left. Returns the new timestamp version."""
    repo_dir = Path(repo_dir)
    now = now or _utcnow()
    with _locked(repo_dir):
        cur = _load_current(repo_dir / "metadata")
        renew_targets = _half_expired(cur.targets.signed, settings, now)
        renew_snapshot = renew_targets or _half_expired(cur.snapshot.signed, settings, now)
        roles = (Timestamp.type,) + ((Snapshot.type,) if renew_snapshot else ()) + (
            (Targets.type,) if renew_targets else ())
        signers = load_signers(Path(keys_dir), cur.root.signed, roles)
        _commit(repo_dir, cur, signers, settings, now, new_targets=renew_targets,
                new_snapshot=renew_snapshot)
        return cur.timestamp.signed.version


def rotate_root(repo_dir: Path, old_root_keys_dir: Path, new_root_keys_dir: Path, *,
                threshold: int, keys: int = 0, settings: RepoSettings = RepoSettings(),
                now: datetime | None = None) -> int:
    """Replace the root keys: generate ``keys`` (default ``threshold``) new root keys into
    the empty ``new_root_keys_dir`` and publish root N+1, signed by a threshold of the old
    keys *and* a threshold of the new ones (so devices that pin root N can follow).
    Returns the new root version."""
    repo_dir, now = Path(repo_dir), now or _utcnow()
    if keys and keys < threshold:
        raise ConfigError(f"keys ({keys}) must be >= threshold ({threshold})", key="keys")
    with _locked(repo_dir):
        meta_dir = repo_dir / "metadata"
        root_md = _read(meta_dir / "root.json", Root)
        old = load_signers(Path(old_root_keys_dir), root_md.signed, (Root.type,))[Root.type]
        new = generate_root_keys(empty_keys_dir(new_root_keys_dir), keys or threshold)
        root = root_md.signed
        for keyid in list(root.roles[Root.type].keyids):
            root.revoke_key(keyid, Root.type)
        for signer in new:
            root.add_key(signer.public_key, Root.type)
        root.roles[Root.type].threshold = threshold
        root.version += 1
        root.expires = now + settings.lifetime(Root.type)
        _sign(root_md, old + new)
        _write(meta_dir / f"{root.version}.root.json", root_md)
        _write(meta_dir / "root.json", root_md)
    logger.info("rotated root to version %d (threshold %d)", root.version, threshold)
    return root.version


def _half_expired(signed: Targets | Snapshot, settings: RepoSettings, now: datetime) -> bool:
    return signed.expires - now < settings.lifetime(signed.type) / 2


def verify_repository(repo_dir: Path) -> None:
    """Check the current metadata chain's signatures (a cheap self-check, not a client)."""
    cur = _load_current(Path(repo_dir) / "metadata")
    root = cur.root.signed
    try:
        root.verify_delegate(Root.type, cur.root.signed_bytes, cur.root.signatures)
        for md in (cur.targets, cur.snapshot, cur.timestamp):
            root.verify_delegate(md.signed.type, md.signed_bytes, md.signatures)
    except TufRepositoryError as e:
        raise RepositoryError(f"repository {repo_dir} does not verify: {e}") from e


__all__ = ["RepoSettings", "ReleaseInfo", "init_repository", "release_bundle", "rotate_root",
           "online_signer",
           "refresh_timestamp", "released_versions", "load_signers", "verify_repository"]
