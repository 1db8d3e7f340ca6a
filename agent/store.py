"""A/B model store: one directory per version, the active one chosen by a symlink.

Layout under ``<state>/models/<model>/``::

    <version>/            manifest.json, the variant file, golden.npz, installed.json
    .staging-<version>/   being assembled; removed on start if left by a crash
    current -> <version>  replaced atomically on commit
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from edgeship.agent.errors import BundleError
from edgeship.common.fsutil import atomic_symlink, atomic_write, fsync_dir, sha256_file
from edgeship.agent.manifest import MANIFEST_NAME, Manifest, Variant
from edgeship.agent.protocol import validate_id

logger = logging.getLogger(__name__)

INSTALLED_NAME = "installed.json"


@dataclass(frozen=True)
class InstalledModel:
    model: str
    version: int
    variant: Variant
    manifest: Manifest
    directory: Path

    @property
    def model_path(self) -> Path:
        return self.directory / self.variant.file

    @property
    def golden_path(self) -> Path:
        return self.directory / self.manifest.golden_file


class ModelStore:
    def __init__(self, root: Path, keep_versions: int = 2) -> None:
        self.root = Path(root)
        self.keep_versions = keep_versions
        self.root.mkdir(parents=True, exist_ok=True)

    def _model_dir(self, model: str) -> Path:
        return self.root / validate_id(model, "model name")

    def models(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / "current").is_symlink())

    def clean_leftovers(self) -> list[Path]:
        """Remove staging directories and temp links left by an interrupted install."""
        removed = []
        for model_dir in self.root.iterdir():
            if not model_dir.is_dir():
                continue
            for p in model_dir.iterdir():
                if p.name.startswith(".staging-") or p.name.endswith(".tmp"):
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                    removed.append(p)
        return removed

    def staging_dir(self, model: str, version: int) -> Path:
        d = self._model_dir(model) / f".staging-{version}"
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        return d

    def finalize(self, model: str, version: int, staging: Path, manifest: Manifest,
                 variant: Variant) -> InstalledModel:
        """Turn a verified staging directory into version ``version`` (not yet active)."""
        for f in staging.iterdir():  # file contents on disk before the version exists
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        atomic_write(staging / INSTALLED_NAME, json.dumps(
            {"variant": variant.id, "installed_at": time.time()}).encode())
        fsync_dir(staging)
        final = self._model_dir(model) / str(version)
        self.remove_version(model, version)
        staging.rename(final)
        fsync_dir(final.parent)
        return InstalledModel(model, version, variant, manifest, final)

    def activate(self, model: str, version: int) -> None:
        atomic_symlink(self._model_dir(model) / "current", str(version))

    def active_version(self, model: str) -> int | None:
        link = self._model_dir(model) / "current"
        return int(link.readlink().name) if link.is_symlink() else None

    def deactivate(self, model: str) -> None:
        """No active version any more (a first install was reverted)."""
        link = self._model_dir(model) / "current"
        link.unlink(missing_ok=True)
        fsync_dir(link.parent)

    def remove_version(self, model: str, version: int) -> None:
        """Delete an inactive version: renamed aside first, so a crash never leaves a
        half-deleted directory that looks like a version."""
        d = self._model_dir(model) / str(version)
        if not d.exists():
            return
        if self.active_version(model) == version:
            raise BundleError(f"refusing to remove the active {model} v{version}")
        trash = d.parent / f".staging-{version}.removing"
        if trash.exists():
            shutil.rmtree(trash)
        d.rename(trash)
        fsync_dir(d.parent)
        shutil.rmtree(trash, ignore_errors=True)

    def active(self, model: str) -> InstalledModel | None:
        link = self._model_dir(model) / "current"
        if not link.is_symlink():
            return None
        return self.load(model, int(link.readlink().name))

    def load(self, model: str, version: int) -> InstalledModel:
        d = self._model_dir(model) / str(version)
        try:
            manifest = Manifest.from_bytes((d / MANIFEST_NAME).read_bytes())
            installed = json.loads((d / INSTALLED_NAME).read_bytes())
            variant = manifest.variant(installed["variant"])
        except (OSError, ValueError, KeyError) as e:
            raise BundleError(f"installed {model} v{version} is unreadable: {e}") from e
        return InstalledModel(model, version, variant, manifest, d)

    def verify(self, installed: InstalledModel) -> bool:
        """The variant and golden files still match the manifest (size and sha256)."""
        m, v = installed.manifest, installed.variant
        for path, size, sha in ((installed.model_path, v.size, v.sha256),
                                (installed.golden_path, m.golden_size, m.golden_sha256)):
            try:
                if path.stat().st_size != size or sha256_file(path) != sha:
                    return False
            except OSError:
                return False
        return True

    def versions(self, model: str) -> list[int]:
        d = self._model_dir(model)
        if not d.exists():
            return []
        return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and p.is_dir())

    def prune(self, model: str) -> None:
        """Keep the active version and the newest ``keep_versions - 1`` others."""
        current = self.active(model)
        others = [v for v in self.versions(model) if not current or v != current.version]
        for v in others[:max(0, len(others) - (self.keep_versions - 1))]:
            self.remove_version(model, v)
