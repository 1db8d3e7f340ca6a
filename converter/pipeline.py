"""The conversion loop: source → variants → evaluate every output → gate → bundle.

Each variant is made and measured on its own: one that cannot be made, cannot be run or
misses its gate is reported with a structured reason and left out; the bundle ships the
ones that passed. Only when none passed does the conversion fail (and write nothing).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from edgeship.agent.errors import BundleError
from edgeship.agent.protocol import validate_id
from edgeship.converter.accuracy_aware import FallbackSettings, quantize_with_fallback
from edgeship.converter.bundle import BundleOptions, VariantArtifact, write_bundle
from edgeship.converter.compression import zstd_size
from edgeship.converter.errors import EvaluationError, InputError, VariantSkipped
from edgeship.converter.evaluate import (EvalSettings, Reference, evaluate, make_reference,
                                         quick, reference_from)
from edgeship.converter.export import ExportSettings, export_onnx
from edgeship.converter.gates import Gate, check_gate
from edgeship.converter.graph import compact_names, io_info, looks_like_transformer, normalize
from edgeship.converter.metrics import TASKS, infer_task
from edgeship.converter.quantize import QuantizeSettings, quantize_int8_static
from edgeship.converter.results import ConvertResult, VariantReport, measured_on, refuse
from edgeship.converter.samples import (Outputs, RawData, Samples, TensorInfo, as_raw,
                                        first_line, synthesize)
from edgeship.converter.variants import (PRECISION_OF, make_fp16, make_fp32,
                                         make_int8_dynamic, runtime_of)

logger = logging.getLogger(__name__)

GOLDEN_SAMPLES = 8
TRANSFORMER_OPS = ("MatMul", "Gemm")
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
    task: str | None = None  # None: inferred from the model's signature
    latency_budget_ms: float | None = None  # the release's own budget (manifest)
    skipped: Mapping[str, str] | None = None  # variant -> why it is not made at all

    def __post_init__(self) -> None:
        if self.task is not None and self.task not in TASKS:
            raise InputError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}",
                             key="task")


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


Maker = Callable[[Path], tuple[Path, dict]]  # work dir -> (variant file, notes)


@dataclass
class _Job:
    """Everything the variant loop needs, whatever the source was."""

    source: Path  # the fp32 ONNX (or .tflite) every variant is made from
    inputs: tuple[TensorInfo, ...]
    reference: Reference
    val: Samples
    calib: Samples | None
    makers: dict[str, Maker]
    work: Path
    warnings: list[str]


# --- sources --------------------------------------------------------------------------------

def torch_outputs(model, samples: Samples, names: Sequence[str],
                  input_names: Sequence[str]) -> Outputs:
    """The torch model's outputs on every sample (its tuple/dict outputs flattened)."""
    import torch

    model.eval()
    per = []
    with torch.no_grad():
        for feed in samples.feeds():
            out = model(*[torch.from_numpy(np.ascontiguousarray(feed[n]))
                          for n in input_names])
            per.append(tuple(np.asarray(t.detach().numpy()) for t in _flatten(out)))
    return Outputs(tuple(names), per)


def _flatten(out) -> list:
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flatten(o)]
    return [out]


def _task(settings: ConvertSettings, inputs, outputs, samples: Samples) -> str:
    if settings.task is not None:
        return settings.task
    task = infer_task(inputs, outputs, samples.y)
    logger.info("task inferred from the signature: %s (--task to set it)", task)
    return task


def _data(raw, inputs: Sequence[TensorInfo], what: str) -> Samples | None:
    raw = as_raw(raw, source=what)
    if raw is None or isinstance(raw, Samples):
        return raw
    return raw.match(inputs)


def _samples(calib, val, inputs: Sequence[TensorInfo],
             warnings: list[str]) -> tuple[Samples | None, Samples]:
    calib_s = _data(calib, inputs, "--calib")
    val_s = _data(val, inputs, "--val") or calib_s
    if val_s is None:
        val_s = synthesize(inputs)
        warnings.append(f"no data: accuracy not measured; every variant was compared with "
                        f"the source model on {len(val_s)} synthesized inputs by cosine "
                        "and SNR only (give --calib/--val to measure it)")
    return calib_s, val_s


def _gate_for(settings: ConvertSettings, val: Samples) -> ConvertSettings:
    """On synthesized inputs an argmax agreement measures noise, not the model: only the
    output-closeness gates (cosine, SNR, exact integer outputs) apply."""
    if not val.synthesized:
        return settings
    return replace(settings, gate=replace(settings.gate, min_agreement=0.0))


# --- making the variants --------------------------------------------------------------------

def onnx_makers(source: Path, calib: Samples | None, gate_fn, settings: ConvertSettings
                ) -> dict[str, Maker]:
    def fp32(work: Path):
        return make_fp32(source, work / "onnx-fp32.onnx"), {}

    def fp16(work: Path):
        return make_fp16(source, work / "onnx-fp16.onnx"), {}

    def dynamic(work: Path):
        dst = make_int8_dynamic(source, work / "onnx-int8-dynamic.onnx")
        return dst, {"names_compacted_bytes": compact_names(dst)}

    def static(work: Path):
        if calib is None:
            raise VariantSkipped("needs calibration data (--calib)")
        dst = work / "onnx-int8.onnx"
        quantize = settings.quantize
        notes: dict = {"calibration": quantize.calibration_method,
                       "calibration_samples": min(len(calib),
                                                  quantize.max_calibration_samples)}
        if quantize.op_types is None and looks_like_transformer(source):
            quantize = replace(quantize, op_types=TRANSFORMER_OPS)
            notes["transformer"] = "only MatMul/Gemm quantized"
        if not settings.fallback.enabled:
            prepared = quantize_int8_static(source, dst, calib, quantize)
            notes.update(prepared.notes())
        else:
            notes.update(quantize_with_fallback(source, dst, calib, gate_fn, quantize,
                                                settings.fallback).notes())
        notes["names_compacted_bytes"] = compact_names(dst)
        return dst, notes

    return {"onnx-fp32": fp32, "onnx-fp16": fp16, "onnx-int8-dynamic": dynamic,
            "onnx-int8": static}


def _gate_fn(val: Samples, reference: Reference, settings: ConvertSettings):
    """Gate check of an ONNX file, for the accuracy-aware INT8 search (no latency runs)."""
    def check(path: Path) -> list:
        metrics, _ = evaluate(path, val, reference, quick(settings.evaluate), timed=False)
        return [f for f in check_gate(metrics, settings.gate) if f.gate != "latency_p99"]
    return check


def _one_variant(vid: str, job: _Job, settings: ConvertSettings,
                 steps: _Steps) -> tuple[VariantReport, Path | None, Outputs | None]:
    """The variant's report, its file when it passed its gate, and its outputs on the
    validation samples (the reference profile reuses them)."""
    runtime, precision = runtime_of(vid), PRECISION_OF[vid]
    steps.step(f"making {vid}")
    maker = job.makers.get(vid)
    try:
        if maker is None:
            raise VariantSkipped("cannot be made from this source")
        path, notes = maker(job.work)
    except VariantSkipped as e:
        return VariantReport(vid, runtime, precision, error=f"skipped: {e}",
                             stage="skipped"), None, None
    except Exception as e:  # noqa: BLE001 - one variant's failure never sinks the others
        logger.info("%s could not be made", vid, exc_info=True)
        return VariantReport(vid, runtime, precision, error=f"could not be made: "
                             f"{type(e).__name__}: {_text(e, job)}",
                             stage="make"), None, None
    steps.step(f"evaluating {vid}")
    try:
        metrics, outputs = evaluate(path, job.val, job.reference, settings.evaluate)
    except Exception as e:  # noqa: BLE001
        logger.info("%s could not be measured", vid, exc_info=True)
        return VariantReport(vid, runtime, precision, notes=notes, error=f"could not be "
                             f"run: {_text(e, job)}", stage="evaluate"), None, None
    failures = tuple(check_gate(metrics, settings.gate))
    for f in failures:
        logger.info("%s fails its gate: %s", vid, f)
    return VariantReport(vid, runtime, precision, metrics, failures, notes), path, outputs


def _text(e: BaseException, job: _Job) -> str:
    """The error's text without the scratch directory (which is gone when users read it)."""
    return first_line(e, 1000).replace(f"{job.work}/", "").replace(str(job.work), "")


def _convert_core(job: _Job, out_dir, name: str, version: int, labels: Sequence[str],
                  settings: ConvertSettings, steps: _Steps) -> ConvertResult:
    from edgeship.converter.profile import MAX_PROFILE_SAMPLES

    reports, paths, evaluated = [], {}, {}
    for vid, why in (settings.skipped or {}).items():
        reports.append(VariantReport(vid, runtime_of(vid), PRECISION_OF[vid],
                                     error=f"skipped: {why}", stage="skipped"))
    for vid in settings.variants:
        report, path, outputs = _one_variant(vid, job, settings, steps)
        reports.append(report)
        if report.passed:
            paths[vid] = path
        if report.passed and outputs is not None:  # the rest of them is freed
            evaluated[vid] = outputs.per_sample[:MAX_PROFILE_SAMPLES]
    if not paths:
        raise refuse(reports)
    steps.step("writing bundle")
    ref = job.reference
    reference_info = {"samples": float(len(job.val))}
    if ref.accuracy is not None:
        reference_info["accuracy"] = ref.accuracy
    artifacts = [VariantArtifact(r.id, r.runtime, r.precision, paths[r.id],
                                 {**r.metrics.to_dict(),
                                  "zstd_size_bytes": float(zstd_size(paths[r.id]))})
                 for r in reports if r.passed]
    options = BundleOptions(task=ref.task, reference=reference_info, labels=tuple(labels),
                            latency_budget_ms=settings.latency_budget_ms,
                            measured_on=measured_on(settings.evaluate.threads),
                            golden_samples=settings.golden_samples,
                            signature_from=job.source, profile_samples=job.val,
                            profile_outputs=evaluated)
    manifest = write_bundle(out_dir, name, version, artifacts, job.val,
                            overwrite=settings.overwrite, options=options)
    return ConvertResult(Path(out_dir).resolve(), manifest, tuple(reports), ref.accuracy,
                         ref.task, not job.val.synthesized, tuple(job.warnings))


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


def _run(job_fn, out_dir, name, version, labels, settings: ConvertSettings,
         progress: bool) -> ConvertResult:
    """Make a :class:`_Job` in a scratch directory and run the variant loop on it."""
    _check_out(out_dir, name, settings)
    with tempfile.TemporaryDirectory(prefix="edgeship-convert-") as tmp:
        steps = _Steps(progress, total=2 * len(settings.variants) + 2)
        with steps.active():
            steps.step("loading the source model")
            job = job_fn(Path(tmp), settings, steps)
            return _convert_core(job, out_dir, name, version, labels,
                                 _gate_for(settings, job.val), steps)


# --- entry points ---------------------------------------------------------------------------

def convert_onnx(onnx_path: str | os.PathLike, calib, val, out_dir: str | os.PathLike,
                 name: str, version: int, gate: Gate | None = None, threads: int = 2, *,
                 labels: Sequence[str] = (), settings: ConvertSettings | None = None,
                 progress: bool = False, pins: Mapping[str, Sequence[int]] | None = None,
                 val_y: np.ndarray | None = None) -> ConvertResult:
    """Convert an ONNX file (external data allowed; any inputs). ``calib``/``val``:
    :class:`Samples`, :class:`RawData`, a plain batch for single-input models, or None
    (no data: the variants that need none, compared on synthesized inputs)."""
    settings = _settings(settings, gate, threads)
    shown = str(onnx_path)
    if not Path(onnx_path).is_file():
        raise InputError(f"{shown}: no such file")

    def job(work: Path, settings: ConvertSettings, steps: _Steps) -> _Job:
        source = normalize(onnx_path, work / "source.onnx", shown, pins)
        inputs, outputs = io_info(source)
        _check_dtypes(shown, inputs)
        warnings: list[str] = []
        calib_s, val_s = _samples(calib, as_raw(val, val_y, "--val"), inputs, warnings)
        task = _task(settings, inputs, outputs, val_s)
        reference = _reference(source, val_s, task, settings, shown)
        makers = onnx_makers(source, calib_s, _gate_fn(val_s, reference, settings), settings)
        return _Job(source, inputs, reference, val_s, calib_s, makers, work, warnings)

    return _run(job, out_dir, name, version, labels, settings, progress)


def _reference(source: Path, val: Samples, task: str, settings: ConvertSettings,
               shown: str) -> Reference:
    """The source's outputs on the validation samples; errors name the user's file."""
    from edgeship.converter.evaluate import open_runner

    try:
        open_runner(source, settings.evaluate.threads)
    except EvaluationError as e:
        raise InputError(f"{shown}: {e}") from e
    try:
        return make_reference(source, val, task, settings.evaluate.threads)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{shown}: fails on the {val.source or 'given data'}: "
                         f"{first_line(e)}") from e


def _check_dtypes(shown: str, inputs: Sequence[TensorInfo]) -> None:
    from edgeship.agent.manifest import DTYPES

    bad = [(i.name, i.dtype) for i in inputs if i.dtype not in DTYPES]
    if bad:
        raise InputError(f"{shown}: inputs of types devices cannot take: {bad}")


def convert(model, example_input, calib_x, val_x, val_y, out_dir: str | os.PathLike,
            name: str, version: int, gate: Gate | None = None, threads: int = 2, *,
            labels: Sequence[str] = (), settings: ConvertSettings | None = None,
            progress: bool = False, reference_model=None,
            const_kwargs: Mapping | None = None) -> ConvertResult:
    """Convert a torch ``model`` (one tensor input: rows of ``calib_x``/``val_x``) into a
    gated bundle at ``out_dir``. ``reference_model`` (default ``model``) is what every
    variant is measured against: the original when ``model`` is pruned or distilled.
    ``const_kwargs`` are passed to every call of ``forward`` (non-tensor arguments)."""
    from edgeship.converter.export import INPUT_NAME, with_constants

    settings = _settings(settings, gate, threads)
    model = with_constants(model, const_kwargs)
    ref_model = with_constants(reference_model, const_kwargs) \
        if reference_model is not None else model

    def job(work: Path, settings: ConvertSettings, steps: _Steps) -> _Job:
        fp32 = export_onnx(model, example_input, work / "exported.onnx", settings.export)
        inputs, outputs = io_info(fp32)
        val_s = Samples.from_rows(INPUT_NAME, np.asarray(val_x, np.float32), val_y, "--val")
        calib_s = Samples.from_rows(INPUT_NAME, np.asarray(calib_x, np.float32),
                                    source="--calib")
        names = tuple(o.name for o in outputs)
        task = _task(settings, inputs, outputs, val_s)
        reference = reference_from(torch_outputs(ref_model, val_s, names, (INPUT_NAME,)),
                                   val_s, task)
        makers = onnx_makers(fp32, calib_s, _gate_fn(val_s, reference, settings), settings)
        makers.update(_tflite_makers(model, example_input, calib_s, settings))
        return _Job(fp32, inputs, reference, val_s, calib_s, makers, work, [])

    return _run(job, out_dir, name, version, labels, settings, progress)


def _tflite_makers(model, example_input, calib: Samples,
                   settings: ConvertSettings) -> dict[str, Maker]:
    from edgeship.converter.tflite import make_tflite

    def maker(vid: str) -> Maker:
        def make(work: Path):
            return make_tflite(model, example_input, calib, vid, work / f"{vid}.tflite"), {}
        return make

    return {vid: maker(vid) for vid in settings.variants if runtime_of(vid) == "litert"}


def convert_tflite(tflite_path: str | os.PathLike, calib, val, out_dir: str | os.PathLike,
                   name: str, version: int, gate: Gate | None = None, threads: int = 2, *,
                   labels: Sequence[str] = (), settings: ConvertSettings | None = None,
                   progress: bool = False, val_y: np.ndarray | None = None) -> ConvertResult:
    """Pack an existing ``.tflite``: golden outputs from LiteRT on every input and output;
    with ai-edge-quantizer installed, quantized TFLite variants of it as well."""
    from edgeship.converter.tflite import source_makers, tflite_source

    settings = _settings(settings, gate, threads)
    shown = str(tflite_path)

    def job(work: Path, settings: ConvertSettings, steps: _Steps) -> _Job:
        source, precision = tflite_source(tflite_path, work / "source.tflite", shown)
        from edgeship.converter.evaluate import TFLiteRunner

        runner = TFLiteRunner(source, settings.evaluate.threads)
        warnings: list[str] = []
        calib_s, val_s = _samples(calib, as_raw(val, val_y, "--val"), runner.inputs,
                                  warnings)
        outputs = tuple(TensorInfo(n, "float32", ()) for n in runner.output_names)
        task = _task(settings, runner.inputs, outputs, val_s)
        reference = _reference(source, val_s, task, settings, shown)
        makers = source_makers(source, precision, calib_s)
        return _Job(source, runner.inputs, reference, val_s, calib_s, makers, work,
                    warnings)

    return _run(job, out_dir, name, version, labels, settings, progress)


def convert_digits(out_dir: str | os.PathLike, version: int = 1, *, epochs: int = 15,
                   seed: int = 0, threads: int = 2, gate: Gate | None = None,
                   name: str = "digits", trained=None, progress: bool = False,
                   settings: ConvertSettings | None = None) -> ConvertResult:
    """Train (unless ``trained`` is given) the digits CNN and convert it into a bundle."""
    from edgeship.converter.digits import DIGIT_LABELS, calibration_images, train_digits

    trained = trained or train_digits(epochs=epochs, seed=seed)
    data = trained.data
    settings = settings or ConvertSettings()
    if settings.task is None:
        settings = replace(settings, task="classification")
    return convert(trained.model, data.x_train[:1], calibration_images(data, seed=seed),
                   data.x_test, data.y_test, out_dir, name, version, gate, threads,
                   labels=DIGIT_LABELS, settings=settings, progress=progress)


__all__ = ["ConvertResult", "ConvertSettings", "VariantReport", "RawData", "convert",
           "convert_onnx", "convert_tflite", "convert_digits", "torch_outputs"]
