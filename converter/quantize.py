"""Static INT8 quantization (QDQ, per-channel) with onnxruntime's own tooling, on real graphs.

onnxruntime's pre-processing (symbolic shape inference, then folding) fails on many
published graphs (dynamic-H/W detectors, transformers, PaddlePaddle exports). So the first
quantization walks a ladder until one rung gives a model onnxruntime runs:

1. ``symbolic``: ``quant_pre_process`` with symbolic shape inference (the default);
2. ``onnx``: ``quant_pre_process(skip_symbolic_shape=True)``: ONNX shape inference only;
3. ``fixed-shapes``: the input dims pinned to one calibration sample's, symbolic inference
   without folding, and the original (dynamic) input/output dims put back afterwards;
4. ``none``: the graph as it is.

On each rung every supported operator is quantized first; if that fails, only the compute
operators (Conv, MatMul, Gemm, ...), keeping the part onnxruntime chokes on in float. The
rung that worked is reused by the accuracy-aware rounds (:mod:`converter.accuracy_aware`).
onnxruntime's string-keyed options are built in one place (:func:`_extra_options`).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgeship.agent.errors import ConfigError
from edgeship.converter.errors import QuantizeError
from edgeship.converter.graph import restore_io, scratch_cwd, with_fixed_shapes
from edgeship.converter.samples import Samples, first_line

logger = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
QUANT_TYPES = ("int8", "uint8")
PREP_MODES = ("symbolic", "onnx", "fixed-shapes", "none")
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class QuantizeSettings:
    calibration_method: str = "minmax"
    per_channel: bool = True
    activation_type: str = "uint8"
    weight_type: str = "int8"
    # 7-bit weights: avoids the u8×s8 16-bit saturation of x86 AVX2 kernels without VNNI,
    # so results agree across x86 (with or without VNNI) and ARM devices.
    reduce_range: bool = True
    max_calibration_samples: int = 200
    prep_modes: tuple[str, ...] = PREP_MODES
    op_types: tuple[str, ...] | None = None  # None: every operator, then compute ops only

    def __post_init__(self) -> None:
        if self.calibration_method not in CALIBRATION_METHODS:
            raise ConfigError(f"calibration_method {self.calibration_method!r} not in "
                              f"{CALIBRATION_METHODS}", key="calibration_method")
        for key in ("activation_type", "weight_type"):
            if getattr(self, key) not in QUANT_TYPES:
                raise ConfigError(f"{key} {getattr(self, key)!r} not in {QUANT_TYPES}",
                                  key=key)
        if self.max_calibration_samples < 1:
            raise ConfigError(f"max_calibration_samples must be >= 1, got "
                              f"{self.max_calibration_samples}", key="max_calibration_samples")
        unknown = set(self.prep_modes) - set(PREP_MODES)
        if unknown or not self.prep_modes:
            raise ConfigError(f"prep_modes must be a non-empty subset of {PREP_MODES}",
                              key="prep_modes")


class SamplesCalibrationReader:
    """``CalibrationDataReader`` over :class:`Samples`: one sample per ``get_next()``."""

    def __init__(self, samples: Samples) -> None:
        self._samples = samples
        self._pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= len(self._samples):
            return None
        self._pos += 1
        return self._samples.feed(self._pos - 1)

    def rewind(self) -> None:
        self._pos = 0

    def __iter__(self):
        self.rewind()
        while (feed := self.get_next()) is not None:
            yield feed


def _extra_options(settings: QuantizeSettings) -> dict[str, Any]:
    """The only place onnxruntime's string-keyed quantization options are built."""
    return {"ActivationSymmetric": False, "WeightSymmetric": True}


def _quant_type(name: str):
    from onnxruntime.quantization import QuantType

    return QuantType.QInt8 if name == "int8" else QuantType.QUInt8


def _calibrate_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


def pre_process(src: Path, dst: Path, mode: str, feed: dict | None = None) -> Path:
    """``src`` made ready for quantization by rung ``mode`` of the ladder (module doc)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src).resolve(), Path(dst).resolve()
    with scratch_cwd():
        if mode == "symbolic":
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
        elif mode == "onnx":
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
        elif mode == "fixed-shapes":
            if feed is None:
                raise QuantizeError("fixed-shapes pre-processing needs a calibration sample")
            fixed = with_fixed_shapes(src, dst.with_name(dst.stem + ".fixed.onnx"), feed)
            quant_pre_process(str(fixed), str(dst), skip_symbolic_shape=False,
                              skip_optimization=True)
        else:
            shutil.copyfile(src, dst)
    return dst


@dataclass(frozen=True)
class Prepared:
    """The rung of the ladder that worked: its pre-processed graph and operator choice."""

    path: Path
    mode: str
    op_types: tuple[str, ...] | None  # None: every operator onnxruntime supports
    source: Path
    attempts: tuple[str, ...] = field(default_factory=tuple)  # what failed before it

    def notes(self) -> dict:
        d: dict = {"pre_process": self.mode}
        if self.op_types is not None:
            d["quantized_ops"] = list(self.op_types)
        if self.attempts:
            d["fallbacks"] = list(self.attempts)
        return d


def _calibration(samples: Samples, settings: QuantizeSettings) -> Samples:
    if len(samples) == 0:
        raise QuantizeError("calibration data holds no samples")
    return samples.take(settings.max_calibration_samples)


def quantize_first(src: str | os.PathLike, out: str | os.PathLike, calib: Samples,
                   work: Path, settings: QuantizeSettings = QuantizeSettings()) -> Prepared:
    """The first static INT8 model of ``src`` at ``out``, walking the ladder until one rung
    gives a model onnxruntime loads and runs on a calibration sample."""
    src, out = Path(src).resolve(), Path(out).resolve()
    calib = _calibration(calib, settings)
    attempts: list[str] = []
    src = _with_qdq_opset(src, work / "opset.onnx", attempts)
    for mode in settings.prep_modes:
        try:
            pre = pre_process(src, work / f"pre-{mode}.onnx", mode, calib.feed(0))
        except Exception as e:  # noqa: BLE001 - onnxruntime raises anything here
            attempts.append(f"pre-processing ({mode}): {type(e).__name__}: {first_line(e)}")
            logger.info("%s", attempts[-1])
            continue
        for op_types in ([settings.op_types] if settings.op_types else [None, COMPUTE_OPS]):
            prepared = Prepared(pre, mode, op_types, src, tuple(attempts))
            try:
                quantize_prepared(prepared, out, calib, settings)
                _smoke(out, calib)
                return prepared
            except Exception as e:  # noqa: BLE001
                what = "all operators" if op_types is None else "compute operators"
                attempts.append(f"quantizing ({mode}, {what}): {type(e).__name__}: "
                                f"{first_line(e)}")
                logger.info("%s", attempts[-1])
    out.unlink(missing_ok=True)
    raise QuantizeError("static INT8 failed on every fallback: " + " | ".join(attempts))


def quantize_prepared(prepared: Prepared, out: str | os.PathLike, calib: Samples,
                      settings: QuantizeSettings = QuantizeSettings(),
                      nodes_to_exclude: Sequence[str] = ()) -> Path:
    """Quantize the pre-processed graph of ``prepared`` to QDQ INT8 at ``out``;
    ``nodes_to_exclude`` (node names of that graph) stay in float."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    calib = _calibration(calib, settings)
    try:
        with scratch_cwd():
            quantize_static(
                str(prepared.path), str(out), SamplesCalibrationReader(calib),
                quant_format=QuantFormat.QDQ, per_channel=settings.per_channel,
                reduce_range=settings.reduce_range,
                activation_type=_quant_type(settings.activation_type),
                weight_type=_quant_type(settings.weight_type),
                calibrate_method=_calibrate_method(settings.calibration_method),
                op_types_to_quantize=list(prepared.op_types) if prepared.op_types else None,
                nodes_to_exclude=list(nodes_to_exclude) or None,
                extra_options=_extra_options(settings))
        if prepared.mode == "fixed-shapes":
            restore_io(out, prepared.source)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises many kinds
        out.unlink(missing_ok=True)
        raise QuantizeError(f"static INT8 quantization failed: {type(e).__name__}: "
                            f"{first_line(e)}") from e
    logger.info("quantized (%s) with %d calibration samples, %s", prepared.mode, len(calib),
                settings.calibration_method)
    return out


QDQ_MIN_OPSET = 13  # per-channel DequantizeLinear (its axis attribute) needs opset 13


def _with_qdq_opset(src: Path, dst: Path, attempts: list[str]) -> Path:
    """``src`` converted to opset 13 when it is older (opset-11 exports are common)."""
    import onnx

    from edgeship.converter.graph import opset

    if opset(src) >= QDQ_MIN_OPSET:
        return src
    try:
        model = onnx.version_converter.convert_version(onnx.load(str(src)), QDQ_MIN_OPSET)
        onnx.checker.check_model(model)
        onnx.save_model(model, str(dst))
    except Exception as e:  # noqa: BLE001 - the version converter lacks some adapters
        attempts.append(f"opset {opset(src)} -> {QDQ_MIN_OPSET}: {type(e).__name__}: "
                        f"{first_line(e)}")
        return src
    logger.info("converted opset %d to %d for QDQ quantization", opset(src), QDQ_MIN_OPSET)
    return dst


def _smoke(path: Path, calib: Samples) -> None:
    from edgeship.converter.evaluate import OnnxRunner

    OnnxRunner(path, threads=1).run(calib.feed(0))


def quantize_int8_static(fp32_path: str | os.PathLike, out_path: str | os.PathLike,
                         calib: Samples, settings: QuantizeSettings = QuantizeSettings(),
                         work: Path | None = None) -> Prepared:
    """One static INT8 model (no accuracy search): :func:`quantize_first` in a scratch dir."""
    import tempfile

    out = Path(out_path)
    with tempfile.TemporaryDirectory(prefix=".quant-", dir=work or out.parent) as tmp:
        prepared = quantize_first(fp32_path, out, calib, Path(tmp), settings)
    return prepared
