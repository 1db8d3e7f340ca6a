"""Test helpers: hand-made bundles, a chunk-based TUF fetcher, polling."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
from tuf.api.exceptions import DownloadHTTPError
from tuf.ngclient import FetcherInterface, Updater

from edgeship.agent.manifest import GOLDEN_NAME, MANIFEST_NAME, Manifest, TensorSpec, Variant
from edgeship.agent.protocol import TransferRequest
from edgeship.fleet.transfer import read_chunk


def make_bundle(parent: Path, model: str = "digits", version: int = 1,
                payload: bytes = b"model-bytes") -> Path:
    """Write a tiny bundle directory: two variant files, golden.npz, manifest.json."""
    bundle = parent / f"{model}-v{version}"
    bundle.mkdir(parents=True)
    variants = []
    for vid, runtime, precision, hw in (("onnx-fp32", "onnxruntime", "fp32", ("x86_64",)),
                                        ("onnx-int8", "onnxruntime", "int8",
                                         ("aarch64", "armv7l"))):
        data = payload + b"/" + vid.encode() + b"/" + str(version).encode()
        (bundle / f"{vid}.onnx").write_bytes(data)
        variants.append(Variant(id=vid, runtime=runtime, precision=precision,
                                file=f"{vid}.onnx", sha256=hashlib.sha256(data).hexdigest(),
                                size=len(data), hardware=hw))
    buf = io.BytesIO()
    np.savez(buf, inputs=np.zeros((1, 4), np.float32),
             **{v.id: np.zeros((1, 2), np.float32) for v in variants})
    golden = buf.getvalue()
    (bundle / GOLDEN_NAME).write_bytes(golden)
    manifest = Manifest(model=model, version=version, task="classification",
                        inputs=(TensorSpec("x", "float32", (None, 4)),),
                        outputs=(TensorSpec("y", "float32", (None, 2)),),
                        variants=tuple(variants), golden_file=GOLDEN_NAME,
                        golden_sha256=hashlib.sha256(golden).hexdigest(),
                        golden_size=len(golden))
    (bundle / MANIFEST_NAME).write_bytes(manifest.to_bytes())
    return bundle


def make_tar(bundle: Path, *, top_dir: bool = True) -> Path:
    tar_path = bundle.parent / f"{bundle.name}.tar"
    with tarfile.open(tar_path, "w") as tf:
        for f in sorted(bundle.iterdir()):
            tf.add(f, arcname=f"{bundle.name}/{f.name}" if top_dir else f.name)
    return tar_path


class ChunkFetcher(FetcherInterface):
    """Fetches 'URLs' that are repository paths (``metadata/…``, ``targets/…``) through
    :func:`fleet.transfer.read_chunk`, in small chunks — the way the agent does over MQTT."""

    def __init__(self, repo_dir: Path, chunk: int = 512) -> None:
        self.repo_dir = repo_dir
        self.chunk = chunk
        self.paths: list[str] = []

    def _fetch(self, url: str) -> Iterator[bytes]:
        self.paths.append(url)
        offset = 0
        while True:
            result = read_chunk(self.repo_dir, TransferRequest(url, offset, self.chunk))
            if result.status == 404:
                raise DownloadHTTPError(f"{url} not found", 404)
            assert result.status == 200, result
            if result.data:
                yield result.data
            offset += len(result.data)
            if offset >= result.total:
                return


def make_updater(repo_dir: Path, client_dir: Path) -> tuple[Updater, ChunkFetcher]:
    client_dir.mkdir(parents=True, exist_ok=True)
    (client_dir / "targets").mkdir(exist_ok=True)
    fetcher = ChunkFetcher(repo_dir)
    root = (repo_dir / "metadata" / "1.root.json").read_bytes()
    updater = Updater(metadata_dir=str(client_dir), metadata_base_url="metadata/",
                      target_dir=str(client_dir / "targets"), target_base_url="targets/",
                      fetcher=fetcher, bootstrap=root)
    return updater, fetcher

