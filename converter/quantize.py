"""Static INT8 quantization (QDQ, per-channel) with onnxruntime's own tooling.

This module only feeds calibration images to ``onnxruntime.quantization.quantize_static``
and builds its option dict in one place (:func:`_extra_options`); it re-implements nothing.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.agent.errors import ConfigError
from edgeship.converter.errors import QuantizeError
from edgeship.converter.export import INPUT_NAME

logger = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
QUANT_TYPES = ("int8", "uint8")


@dataclass(frozen=True)
class QuantizeSettings:
    calibration_method: str = "minmax"
    per_channel: bool = True
    activation_type: str = "uint8"
    weight_type: str = "int8"
    # 7-bit weights: avoids the u8×s8 16-bit saturation of x86 AVX2 kernels without VNNI,
    # so results agree across x86 (with or without VNNI) and ARM devices.
    reduce_range: bool = True
    calibration_batch_size: int = 1
    max_calibration_samples: int = 200
    pre_process: bool = True  # onnxruntime's quant_pre_process (shape inference + fold)

    def __post_init__(self) -> None:
        if self.calibration_method not in CALIBRATION_METHODS:
            raise ConfigError(f"calibration_method {self.calibration_method!r} not in "
                              f"{CALIBRATION_METHODS}", key="calibration_method")
        for key in ("activation_type", "weight_type"):
            if getattr(self, key) not in QUANT_TYPES:
                raise ConfigError(f"{key} {getattr(self, key)!r} not in {QUANT_TYPES}",
                                  key=key)
        for key in ("calibration_batch_size", "max_calibration_samples"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}", key=key)


class ArrayCalibrationReader:
    """``CalibrationDataReader`` over an in-memory array: one batch per ``get_next()``."""

    def __init__(self, images: np.ndarray, batch_size: int = 1,
                 input_name: str = INPUT_NAME) -> None:
        self._images = np.ascontiguousarray(images, dtype=np.float32)
        self._batch_size = batch_size
        self._input_name = input_name
        self._pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= len(self._images):
            return None
        batch = self._images[self._pos:self._pos + self._batch_size]
        self._pos += self._batch_size
        return {self._input_name: batch}

    def rewind(self) -> None:
        self._pos = 0

    def __iter__(self):
        self.rewind()
        while (batch := self.get_next()) is not None:
            yield batch


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


def _pre_process(src: Path, dst: Path) -> None:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)


def model_input_name(path: str | os.PathLike) -> str:
    """Name of the first graph input that is not an initializer."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    names = [i.name for i in graph.input if i.name not in inits]
    return names[0] if names else INPUT_NAME


def quantize_int8_static(fp32_path: str | os.PathLike, out_path: str | os.PathLike,
                         calibration_images: np.ndarray,
                         settings: QuantizeSettings = QuantizeSettings(),
                         nodes_to_exclude: tuple[str, ...] = ()) -> Path:
    """Quantize the fp32 model at ``fp32_path`` to QDQ INT8 at ``out_path``.

    ``nodes_to_exclude`` (node names of the pre-processed graph) stay in float.
    """
    from onnxruntime.quantization import QuantFormat, quantize_static

    calib = np.asarray(calibration_images, dtype=np.float32)[:settings.max_calibration_samples]
    if calib.ndim < 2 or len(calib) == 0:
        raise QuantizeError(f"calibration data must be a non-empty batch, got shape "
                            f"{calib.shape}")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    reader = ArrayCalibrationReader(calib, settings.calibration_batch_size,
                                    model_input_name(fp32_path))
    with tempfile.TemporaryDirectory(prefix=".quant-", dir=out.parent) as tmp:
        src = Path(fp32_path)
        try:
            if settings.pre_process:
                src = Path(tmp) / "pre.onnx"
                _pre_process(Path(fp32_path), src)
            quantize_static(
                str(src), str(out), reader, quant_format=QuantFormat.QDQ,
                per_channel=settings.per_channel, reduce_range=settings.reduce_range,
                activation_type=_quant_type(settings.activation_type),
                weight_type=_quant_type(settings.weight_type),
                calibrate_method=_calibrate_method(settings.calibration_method),
                nodes_to_exclude=list(nodes_to_exclude) or None,
                extra_options=_extra_options(settings))
        except Exception as e:  # noqa: BLE001 - onnxruntime raises many kinds
            out.unlink(missing_ok=True)
            raise QuantizeError(f"static INT8 quantization of {fp32_path} failed: "
                                f"{type(e).__name__}: {e}") from e
    logger.info("quantized %s → %s (%d calibration samples, %s)", fp32_path, out,
                len(calib), settings.calibration_method)
    return out
