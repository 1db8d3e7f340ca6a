"""The conversion loop: export → fp32 + int8 → evaluate → gate → bundle the survivors."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from edgeship.agent.errors import BundleError
from edgeship.agent.manifest import Manifest
from edgeship.agent.protocol import validate_id
from edgeship.converter.bundle import VariantArtifact, write_bundle
from edgeship.converter.errors import NoVariantPassedError
from edgeship.converter.evaluate import (EvalSettings, VariantMetrics, evaluate_variant, open_session,
                                run_batched)
from edgeship.converter.export import ExportSettings, export_onnx
from edgeship.converter.gates import Gate, check_gate
from edgeship.converter.accuracy_aware import FallbackSettings, quantize_with_fallback
from edgeship.converter.compression import zstd_size
from edgeship.converter.quantize import QuantizeSettings, quantize_int8_static
from edgeship.converter.variants import (PRECISION_OF, make_fp16, make_fp32, make_int8_dynamic,
                                runtime_of)

logger = logging.getLogger(__name__)

GOLDEN_SAMPLES = 8


DEFAULT_VARIANTS = ("onnx-fp32", "onnx-int8")


@dataclass(frozen=True)
class ConvertSettings:
    gate: Gate = Gate()
    export: ExportSettings = ExportSettings()
    quantize: QuantizeSettings = QuantizeSettings()
    fallback: FallbackSettings = FallbackSettings()
    evaluate: EvalSettings = EvalSettings()
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    golden_samples: int = GOLDEN_SAMPLES
    overwrite: bool = False


@dataclass(frozen=True)
class VariantReport:
    id: str
    runtime: str
    precision: str
    metrics: VariantMetrics
    failures: tuple[str, ...] = ()
    notes: dict = field(default_factory=dict)  # e.g. nodes kept in float by the fallback

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {"id": self.id, "runtime": self.runtime, "precision": self.precision,
                "passed": self.passed, "failures": list(self.failures),
                "metrics": self.metrics.to_dict(), "notes": dict(self.notes)}


@dataclass(frozen=True)
class ConvertResult:
    bundle_dir: Path
    manifest: Manifest
    reports: tuple[VariantReport, ...]
    reference_accuracy: float | None

    @property
    def shipped(self) -> tuple[str, ...]:
        return tuple(v.id for v in self.manifest.variants)

    def to_dict(self) -> dict:
        return {"bundle_dir": str(self.bundle_dir), "model": self.manifest.model,
                "version": self.manifest.version, "shipped": list(self.shipped),
                "reference_accuracy": self.reference_accuracy,
                "variants": [r.to_dict() for r in self.reports]}


@dataclass(frozen=True)
class _Candidate:
    id: str
    precision: str
    path: Path
    notes: dict = field(default_factory=dict)
    runtime: str = "onnxruntime"


class _Steps:
    """Optional rich progress on stderr; a no-op when ``enabled`` is false."""

    def __init__(self, enabled: bool, total: int) -> None:
        self._progress = None
        self._task = None
        if enabled:
            with contextlib.suppress(ImportError):
                from rich.console import Console
                from rich.progress import Progress

                self._progress = Progress(console=Console(stderr=True), transient=True)
                self._task = self._progress.add_task("converting", total=total)

    @contextlib.contextmanager
    def active(self) -> Iterator["_Steps"]:
        if self._progress is None:
            yield self
            return
        with self._progress:
            yield self

    def step(self, description: str) -> None:
        logger.info("%s", description)
        if self._progress is not None:
            self._progress.update(self._task, description=description, advance=1)


def torch_reference(model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The source model's outputs on ``x`` (the reference every variant is held to)."""
    import torch

    model.eval()
    with torch.no_grad():
        outs = [model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size],
                                                            dtype=np.float32))).numpy()
                for i in range(0, len(x), batch_size)]
    return np.concatenate(outs, axis=0)


def _gate_fn(val_x, val_y, reference, ref_acc, settings: ConvertSettings):
    """Gate check of an ONNX file, for the accuracy-aware INT8 search (no latency runs)."""
    quick = replace(settings.evaluate, warmup_runs=0, timed_runs=1)

    def check(path: Path) -> list[str]:
        metrics, _ = evaluate_variant(path, val_x, reference, val_y, ref_acc, quick)
        return [f for f in check_gate(metrics, settings.gate) if "latency" not in f]
    return check


def _make_onnx_candidates(fp32_src: Path, calib_x, work: Path, settings: ConvertSettings,
                          steps: _Steps, gate_fn) -> list[_Candidate]:
    wanted = [v for v in settings.variants if runtime_of(v) == "onnxruntime"]
    out = []
    for vid in wanted:
        steps.step(f"making {vid}")
        dst = work / f"{vid}.onnx"
        notes: dict = {}
        if vid == "onnx-fp32":
            make_fp32(fp32_src, dst)
        elif vid == "onnx-fp16":
            make_fp16(fp32_src, dst)
        elif vid == "onnx-int8-dynamic":
            make_int8_dynamic(fp32_src, dst)
        elif settings.fallback.enabled:
            result = quantize_with_fallback(fp32_src, dst, calib_x, gate_fn,
                                            settings.quantize, settings.fallback)
            notes = {"nodes_in_float": list(result.excluded), "int8_rounds": result.rounds,
                     "calibration": settings.quantize.calibration_method}
        else:
            quantize_int8_static(fp32_src, dst, calib_x, settings.quantize)
            notes = {"calibration": settings.quantize.calibration_method}
        out.append(_Candidate(vid, PRECISION_OF[vid], dst, notes))
    return out


def _evaluate_all(candidates: Sequence[_Candidate], val_x, val_y, reference,
                  reference_accuracy, settings: ConvertSettings,
                  steps: _Steps) -> list[VariantReport]:
    from edgeship.converter.evaluate import evaluate_any

    reports = []
    for c in candidates:
        steps.step(f"evaluating {c.id}")
        metrics, _ = evaluate_any(c.path, val_x, reference, val_y, reference_accuracy,
                                  settings.evaluate)
        failures = tuple(check_gate(metrics, settings.gate))
        for reason in failures:
            logger.info("%s fails its gate: %s", c.id, reason)
        reports.append(VariantReport(c.id, c.runtime, c.precision, metrics, failures,
                                     c.notes))
    return reports


def _refuse(reports: Sequence[VariantReport]) -> NoVariantPassedError:
    failures = {r.id: list(r.failures) for r in reports}
    detail = "; ".join(f"{k}: {', '.join(v)}" for k, v in failures.items())
    return NoVariantPassedError(f"no variant passed the gate ({detail})", failures=failures,
                                reports=tuple(reports))


def convert(model, example_input, calib_x: np.ndarray, val_x: np.ndarray,
            val_y: np.ndarray | None, out_dir: str | os.PathLike, name: str, version: int,
            gate: Gate | None = None, threads: int = 2, *, labels: Sequence[str] = (),
            settings: ConvertSettings | None = None, progress: bool = False,
            reference_model=None) -> ConvertResult:
    """Convert a torch ``model`` into a gated bundle directory at ``out_dir``.

    ``reference_model`` (default ``model``) is what every variant is measured against:
    pass the original when ``model`` is a pruned or distilled version of it.

    Raises :class:`~converter.errors.GateError` (``NoVariantPassedError``) and writes nothing
    if no variant passes; :class:`~agent.errors.BundleError` if ``out_dir`` exists.
    """
    settings = _settings(settings, gate, threads)
    _check_out(out_dir, name, settings)
    reference = torch_reference(reference_model if reference_model is not None else model,
                                val_x)
    with tempfile.TemporaryDirectory(prefix="edgeship-convert-") as tmp:
        steps = _Steps(progress, total=2 * len(settings.variants) + 2)
        with steps.active():
            steps.step("exporting fp32 ONNX")
            fp32 = export_onnx(model, example_input, Path(tmp) / "exported.onnx",
                               settings.export)
            extra = _tflite_candidates(model, example_input, calib_x, Path(tmp), settings,
                                       steps)
            return _convert_core(fp32, reference, calib_x, val_x, val_y, out_dir, name,
                                 version, labels, settings, steps, Path(tmp), extra)


def convert_onnx(onnx_path: str | os.PathLike, calib_x: np.ndarray, val_x: np.ndarray,
                 val_y: np.ndarray | None, out_dir: str | os.PathLike, name: str,
                 version: int, gate: Gate | None = None, threads: int = 2, *,
                 labels: Sequence[str] = (), settings: ConvertSettings | None = None,
                 progress: bool = False) -> ConvertResult:
    """Convert an ONNX file (external data allowed); the reference is the file itself."""
    from edgeship.converter.sources import load_onnx_model

    settings = _settings(settings, gate, threads)
    _check_out(out_dir, name, settings)
    with tempfile.TemporaryDirectory(prefix="edgeship-convert-") as tmp:
        fp32 = load_onnx_model(onnx_path, Path(tmp) / "source.onnx", val_x[:1])
        reference = run_batched(open_session(fp32, settings.evaluate.threads), val_x)
        steps = _Steps(progress, total=2 * len(settings.variants) + 1)
        with steps.active():
            return _convert_core(fp32, reference, calib_x, val_x, val_y, out_dir, name,
                                 version, labels, settings, steps, Path(tmp), [])


def _settings(settings: ConvertSettings | None, gate: Gate | None,
              threads: int) -> ConvertSettings:
    settings = settings or ConvertSettings()
    if gate is not None:
        settings = replace(settings, gate=gate)
    return replace(settings, evaluate=replace(settings.evaluate, threads=threads))


def _check_out(out_dir, name: str, settings: ConvertSettings) -> None:
    validate_id(name, "model name")
    if Path(out_dir).exists() and not settings.overwrite:
        raise BundleError(f"{out_dir} already exists; choose another directory or version")


def _tflite_candidates(model, example_input, calib_x, work: Path,
                       settings: ConvertSettings, steps: _Steps) -> list[_Candidate]:
    wanted = [v for v in settings.variants if runtime_of(v) == "litert"]
    if not wanted:
        return []
    from edgeship.converter.tflite import make_tflite

    out = []
    for vid in wanted:
        steps.step(f"making {vid}")
        path = make_tflite(model, example_input, calib_x, vid, work / f"{vid}.tflite")
        out.append(_Candidate(vid, PRECISION_OF[vid], path, runtime="litert"))
    return out


def _convert_core(fp32: Path, reference, calib_x, val_x, val_y, out_dir, name, version,
                  labels, settings: ConvertSettings, steps: _Steps, work: Path,
                  extra: list[_Candidate]) -> ConvertResult:
    ref_acc = None if val_y is None else float((reference.argmax(axis=1) == val_y).mean())
    gate_fn = _gate_fn(val_x, val_y, reference, ref_acc, settings)
    candidates = _make_onnx_candidates(fp32, calib_x, work, settings, steps, gate_fn)
    candidates += extra
    reports = _evaluate_all(candidates, val_x, val_y, reference, ref_acc, settings, steps)
    if not any(r.passed for r in reports):
        raise _refuse(reports)
    steps.step("writing bundle")
    reference_info = {"samples": float(len(val_x))}
    if ref_acc is not None:
        reference_info["accuracy"] = ref_acc
    manifest = write_bundle(out_dir, name, version, _artifacts(candidates, reports),
                            val_x[:settings.golden_samples], reference=reference_info,
                            labels=labels, overwrite=settings.overwrite,
                            signature_from=fp32, profile_samples=(val_x, val_y))
    return ConvertResult(Path(out_dir).resolve(), manifest, tuple(reports), ref_acc)


def _artifacts(candidates: Sequence[_Candidate],
               reports: Sequence[VariantReport]) -> list[VariantArtifact]:
    passed = {r.id: r for r in reports if r.passed}
    return [VariantArtifact(c.id, c.runtime, c.precision, c.path,
                            {**passed[c.id].metrics.to_dict(),
                             "zstd_size_bytes": float(zstd_size(c.path))})
            for c in candidates if c.id in passed]


def convert_digits(out_dir: str | os.PathLike, version: int = 1, *, epochs: int = 15,
                   seed: int = 0, threads: int = 2, gate: Gate | None = None,
                   name: str = "digits", trained=None, progress: bool = False,
                   settings: ConvertSettings | None = None) -> ConvertResult:
    """Train (unless ``trained`` is given) the digits CNN and convert it into a bundle."""
    from edgeship.converter.digits import DIGIT_LABELS, calibration_images, train_digits

    trained = trained or train_digits(epochs=epochs, seed=seed)
    data = trained.data
    return convert(trained.model, data.x_train[:1], calibration_images(data, seed=seed),
                   data.x_test, data.y_test, out_dir, name, version, gate, threads,
                   labels=DIGIT_LABELS, settings=settings, progress=progress)
