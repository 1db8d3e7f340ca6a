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
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from edgeship.agent.errors import BundleError
from edgeship.agent.manifest import (DTYPES, GOLDEN_NAME, MANIFEST_NAME, RUNTIME_HARDWARE,
                                     Manifest, TensorSpec, Variant)

if TYPE_CHECKING:
    from edgeship.converter.samples import Samples

logger = logging.getLogger(__name__)

FP32_ATOL = 1e-4
FP32_RELATIVE_ATOL = 1e-4  # of the output's peak: other CPUs round differently
FP16_MIN_ATOL = 1e-3
FP16_RELATIVE_ATOL = 1e-2
INT8_MIN_ATOL = 0.05
INT8_RELATIVE_ATOL = 0.05
INTEGER_ATOL = 0.5  # integer/boolean outputs must match exactly
VARIANT_FILES = {"onnx-fp32": "model.fp32.onnx", "onnx-int8": "model.int8.onnx"}
GOLDEN_SAMPLES = 8


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


def golden_atol(precision: str, outputs) -> float:
    """Tolerance a device applies when comparing one output with its golden values.

    Results differ across CPUs by rounding, which grows with the output's magnitude; int8
    kernels may round differently (e.g. with or without VNNI), fp16 ones keep fewer bits.
    Integer outputs (indices, counts) must match exactly.
    """
    arrays = [np.asarray(o) for o in (outputs if isinstance(outputs, (list, tuple))
                                      else [outputs])]
    if arrays and arrays[0].dtype.kind != "f":
        return INTEGER_ATOL
    peak = max((float(np.abs(a).max()) for a in arrays if a.size), default=0.0)
    if precision.startswith("int8"):
        return max(INT8_MIN_ATOL, INT8_RELATIVE_ATOL * peak)
    if precision == "fp16":
        return max(FP16_MIN_ATOL, FP16_RELATIVE_ATOL * peak)
    return max(FP32_ATOL, FP32_RELATIVE_ATOL * peak)


def _spec(name: str, dtype: str | None, shape) -> TensorSpec:
    if dtype not in DTYPES:
        raise BundleError(f"tensor {name!r} has an element type devices cannot take "
                          f"({dtype})")
    return TensorSpec(name=name, dtype=dtype, shape=tuple(shape))


def tensor_specs(model_path: str | os.PathLike) -> tuple[tuple[TensorSpec, ...],
                                                         tuple[TensorSpec, ...]]:
    """Input and output specs of an ONNX or .tflite file; dynamic dims become ``None``."""
    if Path(model_path).suffix == ".tflite":
        from ai_edge_litert.interpreter import Interpreter

        from edgeship.agent.runtime import ordered_outputs, tensor_affine
        from edgeship.converter.evaluate import _signature_shape

        it = Interpreter(model_path=str(model_path))

        def tflite_spec(d: dict) -> TensorSpec:  # quantized tensors take/give floats
            dtype = "float32" if tensor_affine(d) else np.dtype(d["dtype"]).name
            return _spec(d["name"], dtype, _signature_shape(d))

        return (tuple(tflite_spec(d) for d in it.get_input_details()),
                tuple(tflite_spec(d) for d in ordered_outputs(it)))
    from edgeship.converter.graph import io_info

    inputs, outputs = io_info(model_path)
    return (tuple(_spec(i.name, i.dtype, i.shape) for i in inputs),
            tuple(_spec(o.name, o.dtype, o.shape) for o in outputs))


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
                    golden: dict[str, dict[str, list[np.ndarray]]]) -> tuple[Variant, ...]:
    out = []
    for v in variants:
        dst = tmp / v.file_name
        _copy_file(Path(v.path), dst)
        tolerances = {name: float(v.golden_atol if v.golden_atol is not None
                                  else golden_atol(v.precision, values))
                      for name, values in golden[v.id].items()}
        out.append(Variant(id=v.id, runtime=v.runtime, precision=v.precision,
                           file=v.file_name, sha256=sha256_file(dst),
                           size=dst.stat().st_size, metrics=dict(v.metrics),
                           golden_atol=max(tolerances.values(), default=FP32_ATOL),
                           golden_tolerances=tolerances,
                           hardware=RUNTIME_HARDWARE[v.runtime]))
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


@dataclass(frozen=True)
class BundleOptions:
    """What the manifest says beyond the variants."""

    task: str = "classification"
    reference: dict[str, float] = field(default_factory=dict)
    labels: tuple[str, ...] = ()
    latency_budget_ms: float | None = None
    measured_on: dict[str, str] = field(default_factory=dict)
    golden_samples: int = GOLDEN_SAMPLES
    #: the file the input/output signature is read from (the converter's fp32 export or
    #: the source model); None: the fp32 variant, else the first ONNX variant, else the
    #: first variant (a .tflite file's own signature)
    signature_from: str | os.PathLike | None = None
    #: validation samples (labels included) for the reference profile; None: no profile
    profile_samples: "Samples | None" = None
    #: variant id -> its outputs on the first samples of ``profile_samples``, in order (per
    #: sample, every output in the model's order): the converter's evaluation pass, reused
    #: for the profile. A variant not here, or with fewer samples than the profile takes,
    #: is run over the samples again.
    profile_outputs: Mapping[str, Sequence[Sequence[np.ndarray]]] = field(
        default_factory=dict)


def _as_samples(golden_inputs, in_specs) -> "Samples":
    from edgeship.converter.samples import Samples

    if isinstance(golden_inputs, Samples):
        return golden_inputs
    if isinstance(golden_inputs, tuple):  # (rows, labels or None)
        x, y = golden_inputs
        return Samples.from_rows(in_specs[0].name, np.asarray(x, dtype=in_specs[0].dtype),
                                 None if y is None else np.asarray(y))
    return Samples.from_rows(in_specs[0].name, np.asarray(golden_inputs,
                                                          dtype=in_specs[0].dtype))


def golden_arrays(variants: Sequence[VariantArtifact], samples, in_specs, out_specs,
                  count: int) -> tuple[dict[str, np.ndarray], dict]:
    """The golden file's arrays within its size budget, and each variant's outputs by name.

    Up to ``count`` samples whose inputs take at most half the budget; an input too large
    for that on its own is replaced by a deterministic :func:`agent.golden.pattern`."""
    from edgeship.agent.golden import budget_bytes, pack, pattern
    from edgeship.converter.evaluate import open_runner

    budget = budget_bytes(max(Path(v.path).stat().st_size for v in variants))
    per_sample = sum(samples.arrays[s.name][0].nbytes for s in in_specs)
    k = int(max(1, min(count, len(samples), (budget // 2) // max(per_sample, 1))))
    stored, patterns = {}, {}
    for s in in_specs:
        value = np.asarray(samples.arrays[s.name][:k])
        if value.nbytes > budget // 2:
            first = value[:1]
            lo, hi = (float(first.min()), float(first.max())) if first.size else (0.0, 1.0)
            patterns[s.name] = (tuple(first.shape[1:]), lo, hi, 1)
        else:
            stored[s.name] = value
    feeds = [{s.name: (np.require(stored[s.name][i], requirements="C") if s.name in stored
                       else pattern(*patterns[s.name][:1], s.dtype, *patterns[s.name][1:]))
              for s in in_specs} for i in range(k if stored else 1)]
    outputs = {}
    for v in variants:
        runner = open_runner(v.path, threads=1)
        per = [runner.run(feed) for feed in feeds]
        outputs[v.id] = {o.name: [np.asarray(p[j]) for p in per]
                         for j, o in enumerate(out_specs)}
    return pack(stored, patterns, outputs, budget), outputs


def finish_bundle(tmp: Path, out: Path, manifest: Manifest, overwrite: bool) -> None:
    """Write ``manifest`` into the assembled ``tmp`` and move it into place as ``out``."""
    Manifest.from_bytes(manifest.to_bytes())  # the device's parser must accept it
    _write_file(tmp / MANIFEST_NAME, manifest.to_bytes())
    _fsync_dir(tmp)
    _install_dir(tmp, out, overwrite)


def _signature_file(variants: Sequence[VariantArtifact]) -> Path:
    """The fp32 variant, else the first ONNX variant, else the first variant."""
    for pick in (lambda v: v.precision == "fp32", lambda v: v.runtime == "onnxruntime"):
        found = next((v for v in variants if pick(v)), None)
        if found is not None:
            return Path(found.path)
    return Path(variants[0].path)


def write_bundle(out_dir: str | os.PathLike, model_name: str, version: int,
                 variants: Sequence[VariantArtifact], golden_inputs, *,
                 reference: dict[str, float] | None = None, labels: Sequence[str] = (),
                 task: str = "classification", overwrite: bool = False,
                 options: BundleOptions | None = None,
                 profile_samples: "Samples | tuple[np.ndarray, np.ndarray | None] | None" = None
                 ) -> Manifest:
    """Write a complete bundle directory at ``out_dir`` atomically; returns its manifest.

    ``golden_inputs``: :class:`converter.samples.Samples` (or, for a single-input model, a
    plain batch whose rows become samples). ``profile_samples`` (or ``options``'): the
    validation samples, with their labels if any, for the reference profile
    (``converter.profile``: drift and the label-free estimate on devices)."""
    if not variants:
        raise BundleError("refusing to write a bundle without variants")
    opts = options or BundleOptions(task=task, reference=dict(reference or {}),
                                    labels=tuple(labels))
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not overwrite:
        raise BundleError(f"{out} already exists; choose another directory or version")
    signature = opts.signature_from or _signature_file(variants)
    in_specs, out_specs = tensor_specs(signature)
    samples = _as_samples(golden_inputs, in_specs)
    arrays, golden = golden_arrays(variants, samples, in_specs, out_specs,
                                   opts.golden_samples)
    profile_from = profile_samples if profile_samples is not None else opts.profile_samples
    reused = opts.profile_outputs if profile_samples is None else {}  # of those samples only
    profile = _profile(variants, _as_samples(profile_from, in_specs)
                       if profile_from is not None else None, in_specs, out_specs, opts,
                       reused)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the fleet server reads it as another user
    try:
        entries = _build_variants(tmp, variants, golden)
        _write_file(tmp / GOLDEN_NAME, _npz_bytes(arrays))
        manifest = Manifest(
            model=model_name, version=version, task=opts.task, inputs=in_specs,
            outputs=out_specs, variants=entries, golden_file=GOLDEN_NAME,
            golden_sha256=sha256_file(tmp / GOLDEN_NAME),
            golden_size=(tmp / GOLDEN_NAME).stat().st_size,
            reference=dict(opts.reference), labels=tuple(opts.labels),
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            latency_budget_ms=opts.latency_budget_ms, measured_on=dict(opts.measured_on),
            profile=profile)
        finish_bundle(tmp, out, manifest, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote bundle %s v%d to %s (%s)", model_name, version, out,
                ", ".join(v.id for v in entries))
    return manifest


def _profile(variants: Sequence[VariantArtifact], samples: "Samples | None", in_specs,
             out_specs, opts: BundleOptions,
             reused: Mapping[str, Sequence[Sequence[np.ndarray]]] | None = None
             ) -> dict | None:
    """The reference profile of up to ``MAX_PROFILE_SAMPLES`` validation samples: every
    input by name, each variant's outputs on them (``reused``'s where they cover the
    samples, else from a pass of their own). None without real samples (synthesized
    inputs say nothing about the field), or when the outputs cannot be lined up as rows
    (shapes that vary per sample) — the bundle then ships without one, said in the log."""
    if samples is None or samples.synthesized:
        return None
    from edgeship.converter.profile import MAX_PROFILE_SAMPLES, bundle_profile

    samples = samples.take(MAX_PROFILE_SAMPLES)
    outputs: dict[str, list[np.ndarray]] = {}
    for v in variants:
        per = (reused or {}).get(v.id)
        per = per[:len(samples)] if per is not None and len(per) >= len(samples) \
            else _run_variant(v, samples)
        rows = [_as_rows([np.asarray(p[j]) for p in per]) for j in range(len(out_specs))]
        if any(r is None for r in rows):
            logger.warning("no reference profile: the outputs of %s change shape between "
                           "samples", v.id)
            return None
        outputs[v.id] = [r for r in rows if r is not None]
    inputs = {name: _rows_of(a) for name, a in samples.arrays.items()}
    try:
        return bundle_profile(outputs, inputs, samples.y, input_specs=in_specs,
                              output_specs=out_specs, task=opts.task, labels=opts.labels)
    except ValueError as e:  # a shape the profile cannot summarize: ship without one
        logger.warning("no reference profile: %s", e)
        return None


def _run_variant(v: VariantArtifact, samples: "Samples") -> list[list[np.ndarray]]:
    """``v``'s outputs on every sample, one sample at a time."""
    from edgeship.converter.evaluate import open_runner

    runner = open_runner(v.path, threads=1)
    return [runner.run(feed) for feed in samples.feeds()]


def _rows_of(a: np.ndarray) -> np.ndarray:
    """Samples ``(K, 1, ...)`` of a batch-first input as rows ``(K, ...)``."""
    return a.reshape(a.shape[0], *a.shape[2:]) if a.ndim >= 2 and a.shape[1] == 1 else a


def _as_rows(per_sample: list[np.ndarray]) -> np.ndarray | None:
    """One output over the samples as rows: batch-1 outputs joined on their batch axis."""
    if len({a.shape for a in per_sample}) != 1:
        return None
    first = per_sample[0]
    return np.concatenate(per_sample) if first.ndim and first.shape[0] == 1 \
        else np.stack(per_sample)


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
    from edgeship.agent.errors import HealthCheckError
    from edgeship.agent.golden import load_golden

    names = [o.name for o in manifest.outputs]
    for v in manifest.variants:
        try:
            load_golden(path, v.id, manifest.inputs, names)
        except HealthCheckError as e:
            raise BundleError(f"{path.name}: {e}") from e


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
