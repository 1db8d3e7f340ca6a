"""Read a bundle (directory or tar) and copy its files into the repository, verified.

A bundle is ``manifest.json`` + one file per variant + ``golden.npz`` (see
:mod:`agent.manifest`). Tars are extracted defensively: regular files only, flat names (an
optional single top-level directory is allowed), bounded count and total size. Every file is
hashed while it is copied into place, so what gets signed is exactly what was checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from edgeship.agent.compression import decompress_file, is_zstd
from edgeship.agent.errors import BundleError
from edgeship.agent.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, Variant
from edgeship.fleet.files import fsync_dir

logger = logging.getLogger(__name__)

_COPY_BLOCK = 1024 * 1024
BUNDLE_PREFIX = ".bundle-"  # a tar bundle is extracted into a hidden directory with this


@dataclass(frozen=True)
class BundleLimits:
    max_bundle_bytes: int = 4 * 1024**3
    max_bundle_files: int = 64


@dataclass(frozen=True)
class BundleFile:
    """One file of a bundle as the manifest declares it."""

    name: str
    kind: str  # manifest | variant | golden
    sha256: str
    size: int
    variant: Variant | None = None


@dataclass(frozen=True)
class LoadedBundle:
    manifest: Manifest
    manifest_bytes: bytes
    directory: Path
    files: tuple[BundleFile, ...]  # manifest first, then variants, then golden


@contextlib.contextmanager
def open_bundle(path: Path, workdir: Path, limits: BundleLimits) -> Iterator[LoadedBundle]:
    """Yield the bundle at ``path`` (a directory, a tar or a ``.tar.zst``, extracted under
    ``workdir``)."""
    path = Path(path)
    if path.is_dir():
        yield load_bundle_dir(path)
        return
    if not path.is_file():
        raise BundleError(f"bundle {path} not found")
    with tempfile.TemporaryDirectory(dir=workdir, prefix=BUNDLE_PREFIX) as tmp:
        tar = _decompressed(path, Path(tmp), limits)
        extract_tar(tar, Path(tmp), limits)
        if tar != path:
            tar.unlink()
        yield load_bundle_dir(Path(tmp))


def _decompressed(path: Path, tmp: Path, limits: BundleLimits) -> Path:
    """The tar to extract: ``path`` itself, or for a ``.tar.zst`` (what ``edgeship convert``
    writes) the tar decompressed under ``tmp``, capped at the bundle size limit (a zstd
    frame that would expand past it is refused, not written out)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not is_zstd(head):
        return path
    tar = tmp / ".bundle.tar"
    decompress_file(path, tar, max_output_bytes=limits.max_bundle_bytes)
    return tar


def load_bundle_dir(directory: Path) -> LoadedBundle:
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleError(f"bundle {directory} has no {MANIFEST_NAME}")
    if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{manifest_path} exceeds {MAX_MANIFEST_BYTES} bytes")
    data = manifest_path.read_bytes()
    manifest = Manifest.from_bytes(data)
    files = [BundleFile(MANIFEST_NAME, "manifest", hashlib.sha256(data).hexdigest(),
                        len(data))]
    files += [BundleFile(v.file, "variant", v.sha256, v.size, v) for v in manifest.variants]
    files.append(BundleFile(manifest.golden_file, "golden", manifest.golden_sha256,
                            manifest.golden_size))
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise BundleError(f"manifest of {manifest.model} v{manifest.version} names a file "
                          "twice (variants, golden and manifest.json must differ)")
    for f in files:
        if not (directory / f.name).is_file() or (directory / f.name).is_symlink():
            raise BundleError(f"bundle {directory} lacks {f.name!r} (listed in manifest)")
    extra = {p.name for p in directory.iterdir()} - set(names)
    if extra:
        logger.warning("bundle %s: ignoring files not in the manifest: %s", directory,
                       sorted(extra))
    return LoadedBundle(manifest, data, directory, tuple(files))


def _member_name(member: tarfile.TarInfo) -> tuple[str | None, str]:
    """Split a member name into (top-level dir or None, file name); reject anything else."""
    name = member.name.removeprefix("./")
    parts = name.split("/")
    if (member.name.startswith("/") or "\\" in name or len(parts) > 2
            or any(p in ("", ".", "..") or p.startswith(".") for p in parts)):
        raise BundleError(f"tar member {member.name!r} has an unsafe path")
    return (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])


def _check_dir_member(member: tarfile.TarInfo) -> None:
    name = member.name.removeprefix("./").rstrip("/")
    if name not in ("", ".") and ("/" in name or name.startswith(".") or "\\" in name
                                  or member.name.startswith("/")):
        raise BundleError(f"tar member {member.name!r}: nested directories are not allowed")


def extract_tar(tar_path: Path, dest: Path, limits: BundleLimits) -> None:
    """Extract a bundle tar into ``dest``: regular files only, flat, bounded."""
    total = count = 0
    prefix: set[str | None] = set()
    try:
        with tarfile.open(tar_path, "r:*") as tf:
            for member in tf:
                if member.isdir():
                    _check_dir_member(member)
                    continue
                if not member.isreg():
                    raise BundleError(f"tar member {member.name!r} is not a regular file")
                top, name = _member_name(member)
                prefix.add(top)
                count += 1
                total += member.size
                if len(prefix) > 1:
                    raise BundleError(f"tar {tar_path} mixes top-level directories")
                if count > limits.max_bundle_files or total > limits.max_bundle_bytes:
                    raise BundleError(f"tar {tar_path} exceeds {limits.max_bundle_files} "
                                      f"files or {limits.max_bundle_bytes} bytes")
                src = tf.extractfile(member)
                assert src is not None  # regular file
                _write_exclusive(src, dest / name, member.size)
    except (tarfile.TarError, EOFError) as e:
        raise BundleError(f"cannot read tar {tar_path}: {e}") from e


def _write_exclusive(src: BinaryIO, dest: Path, size: int) -> None:
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError as e:
        raise BundleError(f"tar repeats member {dest.name!r}") from e
    with os.fdopen(fd, "wb") as out:
        remaining = size
        while remaining > 0:
            block = src.read(min(_COPY_BLOCK, remaining))
            if not block:
                raise BundleError(f"tar member {dest.name!r} is truncated")
            out.write(block)
            remaining -= len(block)


def install_file(src: Path, f: BundleFile, dest_dir: Path) -> Path:
    """Copy ``src`` to ``dest_dir/{sha256}.{name}``, hashing as it goes; verify against the
    manifest before the file becomes visible. Idempotent for identical content."""
    dest = dest_dir / f"{f.sha256}.{f.name}"
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=f".{f.name}.", suffix=".tmp")
    try:
        digest, size = _copy_hashing(src, fd, f.size)
        if size != f.size:
            raise BundleError(f"{f.name}: size {size} != manifest size {f.size}")
        if digest != f.sha256:
            raise BundleError(f"{f.name}: sha256 {digest} != manifest sha256 {f.sha256}")
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(dest_dir)
    return dest


def _copy_hashing(src: Path, fd: int, expected_size: int) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    os.fchmod(fd, 0o644)
    with open(src, "rb") as inp, os.fdopen(fd, "wb") as out:
        while block := inp.read(_COPY_BLOCK):
            size += len(block)
            if size > expected_size:  # stop at the declared length
                return "", size
            h.update(block)
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
    return h.hexdigest(), size
