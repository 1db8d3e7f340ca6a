"""Write, pack and verify bundles (see ``agent.manifest`` for the layout).

A bundle directory is built in a temporary sibling directory and moved into place with
``os.replace``, so a reader sees either no bundle or a complete one.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeship.agent.errors import BundleError
from edgeship.agent.manifest import (GOLDEN_NAME, MANIFEST_NAME, RUNTIME_HARDWARE, Manifest,
                                     TensorSpec, Variant)

logger = logging.getLogger(__name__)

FP32_ATOL = 1e-4
INT8_MIN_ATOL = 0.05
INT8_RELATIVE_ATOL = 0.05
VARIANT_FILES = {"onnx-fp32": "model.fp32.onnx", "onnx-int8": "model.int8.onnx"}
_ONNX_DTYPES = {1: "float32", 10: "float16", 3: "int8", 2: "uint8", 6: "int32", 7: "int64"}


@dataclass(frozen=True)
class VariantArtifact:
    """A converted model file plus what the manifest says about it."""

    id: str
    runtime: str
    precision: str
    path: Path
    metrics: dict[str, float] = field(default_factory=dict)
    golden_atol: float | None = None  # None: derived from precision and golden outputs

    @property
    def file_name(self) -> str:
        return VARIANT_FILES.get(self.id, f"model.{self.id}{Path(self.path).suffix}")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def golden_atol(precision: str, outputs: np.ndarray) -> float:
    """Tolerance a device applies when comparing its outputs with the golden ones.

    fp32 results differ across CPUs only by rounding; int8 kernels may round differently
    (e.g. with or without VNNI), so their tolerance scales with the output magnitude.
    """
    if precision.startswith("int8"):
        peak = float(np.abs(outputs).max()) if outputs.size else 0.0
        return max(INT8_MIN_ATOL, INT8_RELATIVE_ATOL * peak)
    return FP32_ATOL


def tensor_specs(onnx_path: str | os.PathLike) -> tuple[tuple[TensorSpec, ...],
                                                        tuple[TensorSpec, ...]]:
    """Input and output specs of an ONNX file; symbolic dimensions become ``None``."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}

    def spec(value) -> TensorSpec:
        t = value.type.tensor_type
        dtype = _ONNX_DTYPES.get(t.elem_type)
        if dtype is None:
            raise BundleError(f"{onnx_path}: tensor {value.name!r} has unsupported "
                              f"element type {t.elem_type}")
        shape = tuple(d.dim_value if d.HasField("dim_value") else None
                      for d in t.shape.dim)
        return TensorSpec(name=value.name, dtype=dtype, shape=shape)

    return (tuple(spec(v) for v in graph.input if v.name not in inits),
            tuple(spec(v) for v in graph.output))


def _golden_outputs(variants: Sequence[VariantArtifact],
                    inputs: np.ndarray) -> dict[str, np.ndarray]:
    from edgeship.converter.evaluate import TFLiteRunner, open_session, run_batched

    return {v.id: (TFLiteRunner(v.path, threads=1).run_all(inputs)
                   if Path(v.path).suffix == ".tflite"
                   else run_batched(open_session(v.path, threads=1), inputs))
            for v in variants}


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _copy_file(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with open(dst, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _build_variants(tmp: Path, variants: Sequence[VariantArtifact],
                    golden: dict[str, np.ndarray]) -> tuple[Variant, ...]:
    out = []
    for v in variants:
        dst = tmp / v.file_name
        _copy_file(Path(v.path), dst)
        atol = v.golden_atol if v.golden_atol is not None else golden_atol(
            v.precision, golden[v.id])
        out.append(Variant(id=v.id, runtime=v.runtime, precision=v.precision,
                           file=v.file_name, sha256=sha256_file(dst),
                           size=dst.stat().st_size, metrics=dict(v.metrics),
                           golden_atol=float(atol), hardware=RUNTIME_HARDWARE[v.runtime]))
    return tuple(out)


def _install_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    old = None
    if out.exists():
        if not overwrite:
            raise BundleError(f"{out} already exists; choose another directory or version")
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    _fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def finish_bundle(tmp: Path, out: Path, manifest: Manifest, overwrite: bool) -> None:
    """Write ``manifest`` into the assembled ``tmp`` and move it into place as ``out``."""
    Manifest.from_bytes(manifest.to_bytes())  # the device's parser must accept it
    _write_file(tmp / MANIFEST_NAME, manifest.to_bytes())
    _fsync_dir(tmp)
    _install_dir(tmp, out, overwrite)


def write_bundle(out_dir: str | os.PathLike, model_name: str, version: int,
                 variants: Sequence[VariantArtifact], golden_inputs: np.ndarray, *,
                 reference: dict[str, float] | None = None, labels: Sequence[str] = (),
                 task: str = "classification", overwrite: bool = False,
                 signature_from: str | os.PathLike | None = None,
                 profile_samples: tuple[np.ndarray, np.ndarray | None] | None = None
                 ) -> Manifest:
    """Write a complete bundle directory at ``out_dir`` atomically; returns its manifest.
    The input/output signature is read from ``signature_from`` (an ONNX file: the
    converter's fp32 export), else from the first ONNX variant — a bundle of TFLite variants
    only (a 32-bit Pi) has none.

    ``profile_samples``: validation inputs and labels (or None) for the reference profile
    (``converter.profile``: drift and the label-free estimate on devices)."""
    if not variants:
        raise BundleError("refusing to write a bundle without variants")
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not overwrite:
        raise BundleError(f"{out} already exists; choose another directory or version")
    inputs = np.ascontiguousarray(golden_inputs, dtype=np.float32)
    golden = _golden_outputs(variants, inputs)
    onnx_files = [v.path for v in variants if v.runtime == "onnxruntime"]
    if signature_from is None and not onnx_files:
        raise BundleError("the input/output signature comes from an ONNX file: give "
                          "signature_from (the fp32 export) for a bundle without ONNX variants")
    in_specs, out_specs = tensor_specs(signature_from or onnx_files[0])
    profile = _profile(variants, profile_samples, in_specs, out_specs, task, labels)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the fleet server reads it as another user
    try:
        entries = _build_variants(tmp, variants, golden)
        _write_file(tmp / GOLDEN_NAME, _npz_bytes({"inputs": inputs, **golden}))
        manifest = Manifest(
            model=model_name, version=version, task=task, inputs=in_specs,
            outputs=out_specs, variants=entries, golden_file=GOLDEN_NAME,
            golden_sha256=sha256_file(tmp / GOLDEN_NAME),
            golden_size=(tmp / GOLDEN_NAME).stat().st_size,
            reference=dict(reference or {}), labels=tuple(labels),
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            profile=profile)
        finish_bundle(tmp, out, manifest, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote bundle %s v%d to %s (%s)", model_name, version, out,
                ", ".join(v.id for v in entries))
    return manifest


def _profile(variants: Sequence[VariantArtifact],
             samples: tuple[np.ndarray, np.ndarray | None] | None, in_specs, out_specs,
             task: str, labels: Sequence[str]) -> dict | None:
    if samples is None:
        return None
    from edgeship.converter.profile import MAX_PROFILE_SAMPLES, bundle_profile

    x, y = samples
    x = np.ascontiguousarray(x[:MAX_PROFILE_SAMPLES], dtype=np.float32)
    y = None if y is None else np.asarray(y)[:MAX_PROFILE_SAMPLES]
    return bundle_profile(_golden_outputs(variants, x), x, y, input_specs=in_specs,
                          output_specs=out_specs, task=task, labels=labels)


def _check_file(path: Path, size: int, sha256: str) -> None:
    if not path.is_file():
        raise BundleError(f"bundle file {path.name} is missing")
    actual = path.stat().st_size
    if actual != size:
        raise BundleError(f"bundle file {path.name} is {actual} bytes, manifest says {size}")
    digest = sha256_file(path)
    if digest != sha256:
        raise BundleError(f"bundle file {path.name} has sha256 {digest}, manifest says "
                          f"{sha256}")


def _check_golden(path: Path, manifest: Manifest) -> None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
    except (OSError, ValueError) as e:
        raise BundleError(f"{path.name} is not a readable npz: {e}") from e
    missing = {"inputs", *(v.id for v in manifest.variants)} - keys
    if missing:
        raise BundleError(f"{path.name} lacks arrays {sorted(missing)}")


def read_bundle_dir(path: str | os.PathLike) -> Manifest:
    """Parse the manifest of a bundle directory and verify every file's size and sha256."""
    root = Path(path)
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleError(f"{root} has no {MANIFEST_NAME}")
    manifest = Manifest.from_bytes(manifest_path.read_bytes())
    for v in manifest.variants:
        _check_file(root / v.file, v.size, v.sha256)
    _check_file(root / manifest.golden_file, manifest.golden_size, manifest.golden_sha256)
    _check_golden(root / manifest.golden_file, manifest)
    return manifest


def pack_bundle(bundle_dir: str | os.PathLike,
                out_path: str | os.PathLike | None = None) -> Path:
    """Verify ``bundle_dir`` and tar it (uncompressed, sorted, files only, flat).

    The default name is ``{model}-v{version}.tar`` next to the bundle directory.
    Member metadata is normalised so equal bundles give byte-identical tars.
    """
    root = Path(bundle_dir)
    manifest = read_bundle_dir(root)
    default_name = f"{manifest.model}-v{manifest.version}.tar"
    out = Path(out_path) if out_path else root.parent / default_name
    names = sorted(p.name for p in root.iterdir() if p.is_file())
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    try:
        os.chmod(tmp_name, 0o644)
        with os.fdopen(fd, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for name in names:
                    _add_member(tar, root / name)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, out)
        _fsync_dir(out.parent)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return out


def _add_member(tar: tarfile.TarFile, path: Path) -> None:
    info = tarfile.TarInfo(name=path.name)
    info.size = path.stat().st_size
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    with open(path, "rb") as f:
        tar.addfile(info, f)
