"""ONNX variants from one fp32 ONNX file, each made by onnxruntime's own tooling.

- ``onnx-fp32``: onnxruntime's offline basic graph optimizations (constant folding,
  redundant-node removal); hardware-independent, so the file runs the same on every board.
- ``onnx-fp16``: ``onnxruntime.transformers.float16`` with float32 inputs/outputs kept.
- ``onnx-int8-dynamic``: ``quantize_dynamic`` (int8 weights, activations quantized at run
  time).
- ``onnx-int8``: ``quantize_static`` QDQ per-channel (see :mod:`converter.quantize`), with
  accuracy-aware fallback in :mod:`converter.accuracy_aware`.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from edgeship.agent.errors import ConfigError
from edgeship.converter.errors import QuantizeError
from edgeship.converter.graph import scratch_cwd
from edgeship.converter.samples import first_line

logger = logging.getLogger(__name__)

ONNX_VARIANTS = ("onnx-fp32", "onnx-fp16", "onnx-int8-dynamic", "onnx-int8")
TFLITE_VARIANTS = ("tflite-fp32", "tflite-fp16", "tflite-int8-dynamic", "tflite-int8")
ALL_VARIANTS = ONNX_VARIANTS + TFLITE_VARIANTS
PRECISION_OF = {
    "onnx-fp32": "fp32", "onnx-fp16": "fp16", "onnx-int8-dynamic": "int8-dynamic",
    "onnx-int8": "int8-static", "tflite-fp32": "fp32", "tflite-fp16": "fp16",
    "tflite-int8-dynamic": "int8-dynamic", "tflite-int8": "int8-static",
}
# Precision names in device profiles → the variant ids that provide them.
VARIANTS_OF_PRECISION = {
    "fp32": ("onnx-fp32", "tflite-fp32"), "fp16": ("onnx-fp16", "tflite-fp16"),
    "int8-dynamic": ("onnx-int8-dynamic", "tflite-int8-dynamic"),
    "int8-static": ("onnx-int8", "tflite-int8"), "int8": ("onnx-int8", "tflite-int8"),
}


def runtime_of(variant_id: str) -> str:
    return "litert" if variant_id.startswith("tflite-") else "onnxruntime"


def validate_variant_ids(ids: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [v for v in ids if v not in ALL_VARIANTS]
    if unknown:
        raise ConfigError(f"unknown variant(s) {unknown}; choose from {list(ALL_VARIANTS)}",
                          key="variants")
    if not ids:
        raise ConfigError("no variants selected", key="variants")
    return ids


def variants_for_precisions(precisions: tuple[str, ...], runtimes: tuple[str, ...]
                            ) -> tuple[str, ...]:
    """Variant ids a device profile asks for (fp32 always included as the safe fallback)."""
    out: list[str] = []
    for p in (*precisions, "fp32"):
        for v in VARIANTS_OF_PRECISION.get(p, ()):
            if runtime_of(v) in runtimes and v not in out:
                out.append(v)
    return tuple(out)


@dataclass(frozen=True)
class DynamicSettings:
    per_channel: bool = True
    reduce_range: bool = True  # same cross-CPU reasoning as the static variant
    op_types: tuple[str, ...] = ()  # empty: every operator quantize_dynamic supports


def make_fp32(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Graph-optimized fp32 copy (onnxruntime basic level, saved offline)."""
    from edgeship.converter.export import optimize_onnx

    shutil.copyfile(src, dst)
    return optimize_onnx(dst, dst)


def make_fp16(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """fp16 weights and compute; the graph's inputs/outputs keep their types."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        with scratch_cwd():
            model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
        onnx.save_model(model, str(dst))
    except Exception as e:  # noqa: BLE001 - onnx tooling raises anything
        Path(dst).unlink(missing_ok=True)
        raise QuantizeError(f"fp16 conversion failed: {type(e).__name__}: "
                            f"{first_line(e)}") from e
    return Path(dst)


def make_int8_dynamic(src: str | os.PathLike, dst: str | os.PathLike,
                      settings: DynamicSettings = DynamicSettings()) -> Path:
    """int8 weights, activations quantized at run time (MatMul/Gemm/Conv/Gather/...)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src).resolve(), Path(dst).resolve()
    try:
        with scratch_cwd():
            quantize_dynamic(str(src), str(dst), per_channel=settings.per_channel,
                             reduce_range=settings.reduce_range,
                             weight_type=QuantType.QInt8,
                             op_types_to_quantize=list(settings.op_types) or None,
                             extra_options={"DefaultTensorType": 1})  # FLOAT where unknown
    except Exception as e:  # noqa: BLE001
        dst.unlink(missing_ok=True)
        raise QuantizeError(f"dynamic INT8 quantization failed: {type(e).__name__}: "
                            f"{first_line(e)}") from e
    return dst
