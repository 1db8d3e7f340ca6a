"""The conversion loop: export → fp32 + int8 → evaluate → gate → bundle the survivors."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from agent.errors import BundleError
from agent.manifest import Manifest
from agent.protocol import validate_id
from converter.bundle import VariantArtifact, write_bundle
from converter.errors import NoVariantPassedError
from converter.evaluate import EvalSettings, VariantMetrics, evaluate_variant
from converter.export import ExportSettings, export_onnx
from converter.gates import Gate, check_gate
from converter.quantize import QuantizeSettings, quantize_int8_static

logger = logging.getLogger(__name__)

GOLDEN_SAMPLES = 8


@dataclass(frozen=True)
class ConvertSettings:
    gate: Gate = Gate()
    export: ExportSettings = ExportSettings()
    quantize: QuantizeSettings = QuantizeSettings()
    evaluate: EvalSettings = EvalSettings()
    golden_samples: int = GOLDEN_SAMPLES
    overwrite: bool = False


@dataclass(frozen=True)
class VariantReport:
    id: str
    runtime: str
    precision: str
    metrics: VariantMetrics
    failures: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {"id": self.id, "runtime": self.runtime, "precision": self.precision,
                "passed": self.passed, "failures": list(self.failures),
                "metrics": self.metrics.to_dict()}


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


def _make_candidates(model, example_input, calib_x, work: Path,
                     settings: ConvertSettings, steps: _Steps) -> list[_Candidate]:
    steps.step("exporting fp32 ONNX")
    fp32 = export_onnx(model, example_input, work / "fp32.onnx", settings.export)
    steps.step("quantizing static INT8")
    int8 = quantize_int8_static(fp32, work / "int8.onnx", calib_x, settings.quantize)
    return [_Candidate("onnx-fp32", "fp32", fp32),
            _Candidate("onnx-int8", "int8-static", int8)]


def _evaluate_all(candidates: Sequence[_Candidate], val_x, val_y, reference,
                  reference_accuracy, settings: ConvertSettings,
                  steps: _Steps) -> list[VariantReport]:
    reports = []
    for c in candidates:
        steps.step(f"evaluating {c.id}")
        metrics, _ = evaluate_variant(c.path, val_x, reference, val_y, reference_accuracy,
                                      settings.evaluate)
        failures = tuple(check_gate(metrics, settings.gate))
        for reason in failures:
            logger.info("%s fails its gate: %s", c.id, reason)
        reports.append(VariantReport(c.id, "onnxruntime", c.precision, metrics, failures))
    return reports


def _refuse(reports: Sequence[VariantReport]) -> NoVariantPassedError:
    failures = {r.id: list(r.failures) for r in reports}
    detail = "; ".join(f"{k}: {', '.join(v)}" for k, v in failures.items())
    return NoVariantPassedError(f"no variant passed the gate ({detail})", failures=failures,
                                reports=tuple(reports))


def convert(model, example_input, calib_x: np.ndarray, val_x: np.ndarray,
            val_y: np.ndarray | None, out_dir: str | os.PathLike, name: str, version: int,
            gate: Gate | None = None, threads: int = 2, *, labels: Sequence[str] = (),
            settings: ConvertSettings | None = None, progress: bool = False) -> ConvertResult:
    """Convert a torch ``model`` into a gated bundle directory at ``out_dir``.

    Raises :class:`~agent.errors.GateError` (``NoVariantPassedError``) and writes nothing
    if no variant passes; :class:`~agent.errors.BundleError` if ``out_dir`` exists.
    """
    settings = settings or ConvertSettings()
    if gate is not None:
        settings = replace(settings, gate=gate)
    settings = replace(settings, evaluate=replace(settings.evaluate, threads=threads))
    validate_id(name, "model name")
    if Path(out_dir).exists() and not settings.overwrite:
        raise BundleError(f"{out_dir} already exists; choose another directory or version")
    reference = torch_reference(model, val_x)
    ref_acc = None if val_y is None else float((reference.argmax(axis=1) == val_y).mean())
    steps = _Steps(progress, total=5)
    with steps.active(), tempfile.TemporaryDirectory(prefix="edgeship-convert-") as tmp:
        candidates = _make_candidates(model, example_input, calib_x, Path(tmp), settings,
                                      steps)
        reports = _evaluate_all(candidates, val_x, val_y, reference, ref_acc, settings,
                                steps)
        if not any(r.passed for r in reports):
            raise _refuse(reports)
        steps.step("writing bundle")
        reference_info = {"samples": float(len(val_x))}
        if ref_acc is not None:
            reference_info["accuracy"] = ref_acc
        manifest = write_bundle(out_dir, name, version, _artifacts(candidates, reports),
                                val_x[:settings.golden_samples], reference=reference_info,
                                labels=labels, overwrite=settings.overwrite)
    return ConvertResult(Path(out_dir).resolve(), manifest, tuple(reports), ref_acc)


def _artifacts(candidates: Sequence[_Candidate],
               reports: Sequence[VariantReport]) -> list[VariantArtifact]:
    passed = {r.id: r for r in reports if r.passed}
    return [VariantArtifact(c.id, "onnxruntime", c.precision, c.path,
                            passed[c.id].metrics.to_dict())
            for c in candidates if c.id in passed]


def convert_digits(out_dir: str | os.PathLike, version: int = 1, *, epochs: int = 15,
                   seed: int = 0, threads: int = 2, gate: Gate | None = None,
                   name: str = "digits", trained=None, progress: bool = False,
                   settings: ConvertSettings | None = None) -> ConvertResult:
    """Train (unless ``trained`` is given) the digits CNN and convert it into a bundle."""
    from converter.digits import DIGIT_LABELS, calibration_images, train_digits

    trained = trained or train_digits(epochs=epochs, seed=seed)
    data = trained.data
    return convert(trained.model, data.x_train[:1], calibration_images(data, seed=seed),
                   data.x_test, data.y_test, out_dir, name, version, gate, threads,
                   labels=DIGIT_LABELS, settings=settings, progress=progress)
