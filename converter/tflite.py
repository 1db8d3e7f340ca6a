"""TFLite variants from a PyTorch model: ``litert-torch`` converts, ``ai-edge-quantizer``
quantizes (both from Google's LiteRT stack; install with ``pip install
'edgeship[tflite-convert]'``).

- ``tflite-fp32``: ``litert_torch.convert(model, (example,))``.
- ``tflite-fp16``: weights cast to float16 (``FLOAT_CASTING``), float compute at run time.
- ``tflite-int8-dynamic``: ``dynamic_wi8_afp32`` (int8 weights, dynamic-range activations).
- ``tflite-int8``: ``static_wi8_ai8`` full-integer with the calibration data as the
  representative dataset (int8 input/output tensors; the runner quantizes/dequantizes).

TFLite needs the PyTorch source: an ONNX-only input cannot make these variants.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path

import numpy as np

from edgeship.converter.errors import ExportError, InputError

logger = logging.getLogger(__name__)

MAX_REPRESENTATIVE_SAMPLES = 100


def available() -> bool:
    try:
        import ai_edge_quantizer  # noqa: F401
        import litert_torch  # noqa: F401
    except ImportError:
        return False
    return True


def _require() -> None:
    if not available():
        raise InputError("TFLite variants need litert-torch and ai-edge-quantizer: "
                         "pip install 'edgeship[tflite-convert]'")


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def export_tflite(model, example_input, out: Path) -> Path:
    """fp32 .tflite with the example input's (static) shape."""
    _require()
    import litert_torch
    import torch

    example = torch.as_tensor(np.asarray(example_input, dtype=np.float32)[:1])
    try:
        with _quiet():
            litert_torch.convert(model.eval(), (example,)).export(str(out))
    except Exception as e:  # noqa: BLE001 - the converter raises anything
        out.unlink(missing_ok=True)
        raise ExportError(f"litert-torch could not convert {type(model).__name__}: "
                          f"{type(e).__name__}: {str(e).strip()[:300]}") from e
    return out


def _recipe(variant_id: str):
    from ai_edge_quantizer import recipe

    return {"tflite-int8-dynamic": recipe.dynamic_wi8_afp32,
            "tflite-int8": recipe.static_wi8_ai8}[variant_id]()


def _calibration(src: Path, calib_x: np.ndarray) -> dict:
    from ai_edge_litert.interpreter import Interpreter

    key, io_names = next(iter(Interpreter(model_path=str(src)).get_signature_list().items()))
    name = io_names["inputs"][0]
    x = np.asarray(calib_x, dtype=np.float32)[:MAX_REPRESENTATIVE_SAMPLES]
    return {key: [{name: x[i:i + 1]} for i in range(len(x))]}


def quantize_tflite(src: Path, variant_id: str, calib_x: np.ndarray, out: Path) -> Path:
    """One quantized .tflite variant of the fp32 file ``src``."""
    from ai_edge_quantizer import qtyping, quantizer
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    if variant_id == "tflite-fp16":
        qz = quantizer.Quantizer(str(src))
        qz.add_weight_only_config(
            regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED, num_bits=16,
            granularity=qtyping.QuantGranularity.TENSORWISE,
            algorithm_key=AlgorithmName.FLOAT_CASTING)
    else:
        qz = quantizer.Quantizer(str(src), _recipe(variant_id))
    try:
        with _quiet():
            calibration = qz.calibrate(_calibration(src, calib_x)) \
                if qz.need_calibration else None
            qz.quantize(calibration).export_model(str(out), overwrite=True)
    except Exception as e:  # noqa: BLE001
        out.unlink(missing_ok=True)
        raise ExportError(f"{variant_id}: ai-edge-quantizer failed: {type(e).__name__}: "
                          f"{str(e).strip()[:300]}") from e
    return out


def make_tflite(model, example_input, calib_x: np.ndarray, variant_id: str,
                out: str | os.PathLike) -> Path:
    """The .tflite file of ``variant_id`` (fp32 is exported once and reused)."""
    out = Path(out)
    fp32 = out.with_name("tflite-fp32.tflite")
    if not fp32.exists():
        export_tflite(model, example_input, fp32)
    if variant_id == "tflite-fp32":
        return fp32
    return quantize_tflite(fp32, variant_id, calib_x, out)
