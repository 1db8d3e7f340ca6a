"""Signed release archives: one file that carries a release to a device with no broker.

``edgeship release … --export FILE`` writes it on the host; ``edgeship agent install FILE``
installs it on the device through the same TUF client, lifecycle, health check and rollback
as an update over the network — the archive only replaces the network. Layout (a tar)::

    release.json                 what it is: {"format", "schema", "model", "version", ...}
    metadata/N.root.json         every root version (a device pinned to an old root follows)
    metadata/timestamp.json  metadata/N.snapshot.json  metadata/N.targets.json
    targets/{model}/{version}/{sha256}.{file}        the release's target files

Nothing in ``release.json`` is trusted: it only says which model and version to ask the
signed metadata for. Reading is bounded: member count, names (no absolute paths, no ``..``,
regular files only) and the size of ``release.json`` are checked before anything is used.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tuf.api import exceptions as tuf_exc

from edgeship.agent.errors import BundleError
from edgeship.agent.update.fetcher_base import FetcherInterface
from edgeship.agent.protocol import validate_id

FORMAT = "edgeship-release"
SCHEMA = 1
INDEX_NAME = "release.json"
#: the base URL the agent's TUF client is given for an archive (metadata/, targets/)
ARCHIVE_URL = "archive://release/"
MAX_MEMBERS = 4096
MAX_INDEX_BYTES = 64 * 1024
CHUNK_BYTES = 256 * 1024


@dataclass(frozen=True)
class ReleaseIndex:
    model: str
    version: int
    created_at: float = 0.0

    def to_bytes(self) -> bytes:
        return json.dumps({"format": FORMAT, "schema": SCHEMA, "model": self.model,
                           "version": self.version, "created_at": self.created_at},
                          indent=2, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, source: str) -> "ReleaseIndex":
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"{source}: {INDEX_NAME} is not JSON: {e}") from e
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise BundleError(f"{source}: not an edgeship release archive")
        if raw.get("schema") != SCHEMA:
            raise BundleError(f"{source}: release archive schema {raw.get('schema')!r} is "
                              f"not {SCHEMA}")
        version = raw.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise BundleError(f"{source}: bad model version {version!r}")
        return cls(validate_id(str(raw.get("model")), "model name"), version,
                   float(raw.get("created_at") or 0.0))


def _safe_member(info: tarfile.TarInfo, source: str) -> str:
    name = info.name
    parts = name.split("/")
    if not info.isfile() or name.startswith("/") or ".." in parts or "" in parts or \
            parts[0] not in ("metadata", "targets", INDEX_NAME):
        raise BundleError(f"{source}: unexpected archive member {name!r}")
    return name


class ReleaseArchive:
    """An opened release archive: its index and a TUF fetcher that reads from it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._tar = tarfile.open(self.path, "r:")
        except (OSError, tarfile.TarError) as e:
            raise BundleError(f"{self.path}: not a release archive ({e})") from e
        try:
            self._members = self._scan()
            self.index = ReleaseIndex.from_bytes(self.read(INDEX_NAME, MAX_INDEX_BYTES),
                                                 str(self.path))
        except (OSError, tarfile.TarError) as e:
            self._tar.close()
            raise BundleError(f"{self.path}: damaged release archive ({e})") from e
        except BaseException:
            self._tar.close()
            raise

    def _scan(self) -> dict[str, tarfile.TarInfo]:
        members: dict[str, tarfile.TarInfo] = {}
        for i, info in enumerate(self._tar):
            if i >= MAX_MEMBERS:
                raise BundleError(f"{self.path}: more than {MAX_MEMBERS} members")
            members[_safe_member(info, str(self.path))] = info
        if INDEX_NAME not in members:
            raise BundleError(f"{self.path}: no {INDEX_NAME}: not an edgeship release archive")
        return members

    def read(self, name: str, max_bytes: int) -> bytes:
        info = self._members.get(name)
        if info is None:
            raise BundleError(f"{self.path}: no {name}")
        if info.size > max_bytes:
            raise BundleError(f"{self.path}: {name} is {info.size} bytes, over {max_bytes}")
        f = self._tar.extractfile(info)
        assert f is not None  # a regular file (checked in _scan)
        return f.read(max_bytes)

    def chunks(self, name: str) -> Iterator[bytes]:
        """The member's bytes in chunks; a missing one is a 404, as a server would say."""
        info = self._members.get(name)
        if info is None:
            raise tuf_exc.DownloadHTTPError(f"{name} is not in {self.path.name}", 404)
        return self._stream(info)

    def _stream(self, info: tarfile.TarInfo) -> Iterator[bytes]:
        try:
            f = self._tar.extractfile(info)
            assert f is not None  # a regular file (checked in _scan)
            while True:
                block = f.read(CHUNK_BYTES)
                if not block:
                    return
                yield block
        except (OSError, tarfile.TarError) as e:  # a truncated archive
            raise tuf_exc.DownloadError(f"cannot read {info.name}: {e}") from e

    def fetcher(self) -> "ArchiveFetcher":
        return ArchiveFetcher(self)

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> "ReleaseArchive":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ArchiveFetcher(FetcherInterface):
    """What the TUF client downloads, read from the archive (``archive://release/...``)."""

    def __init__(self, archive: ReleaseArchive) -> None:
        self.archive = archive

    def _fetch(self, url: str) -> Iterator[bytes]:
        if not url.startswith(ARCHIVE_URL):
            raise tuf_exc.DownloadError(f"{url} is not in a release archive")
        return self.archive.chunks(url[len(ARCHIVE_URL):])
