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

from edgeship.converter.errors import ExportError, InputError, VariantSkipped
from edgeship.converter.samples import Samples, first_line

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
                          f"{type(e).__name__}: {first_line(e)}") from e
    return out


def _recipe(variant_id: str):
    from ai_edge_quantizer import recipe

    return {"tflite-int8-dynamic": recipe.dynamic_wi8_afp32,
            "tflite-int8": recipe.static_wi8_ai8}[variant_id]()


def _calibration(src: Path, calib: Samples) -> dict:
    """The representative dataset per signature input: samples matched by name, else by
    position (signature names are not the tensor names the samples are keyed by)."""
    from ai_edge_litert.interpreter import Interpreter

    key, io_names = next(iter(Interpreter(model_path=str(src)).get_signature_list().items()))
    names = io_names["inputs"]
    if len(names) != len(calib.names):
        raise ExportError(f"the TFLite model takes {len(names)} inputs, the calibration "
                          f"data has {len(calib.names)}")
    keys = [n if n in calib.names else calib.names[i] for i, n in enumerate(names)]
    data = calib.take(MAX_REPRESENTATIVE_SAMPLES)
    return {key: [{sig: feed[k] for sig, k in zip(names, keys)} for feed in data.feeds()]}


def quantize_tflite(src: Path, variant_id: str, calib: Samples | None, out: Path) -> Path:
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
            if qz.need_calibration and calib is None:
                raise InputError(f"{variant_id} needs calibration data (--calib)")
            calibration = qz.calibrate(_calibration(src, calib)) \
                if qz.need_calibration else None
            qz.quantize(calibration).export_model(str(out), overwrite=True)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001
        out.unlink(missing_ok=True)
        raise ExportError(f"{variant_id}: ai-edge-quantizer failed: {type(e).__name__}: "
                          f"{first_line(e)}") from e
    return out


def make_tflite(model, example_input, calib: Samples | None, variant_id: str,
                out: str | os.PathLike) -> Path:
    """The .tflite file of ``variant_id`` (fp32 is exported once and reused)."""
    out = Path(out)
    fp32 = out.with_name("tflite-fp32.tflite")
    if not fp32.exists():
        export_tflite(model, example_input, fp32)
    if variant_id == "tflite-fp32":
        return fp32
    return quantize_tflite(fp32, variant_id, calib, out)


# --- an existing .tflite as the source ----------------------------------------------------

PRECISION_VARIANT = {"fp32": "tflite-fp32", "fp16": "tflite-fp16",
                     "int8-dynamic": "tflite-int8-dynamic", "int8-static": "tflite-int8"}


def detect_precision(path: Path) -> str:
    """fp32, fp16, int8-dynamic (int8 weights, float activations) or int8-static (integer
    inputs with quantization parameters) from the tensors LiteRT reports."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    inputs = it.get_input_details()
    if any(np.dtype(d["dtype"]).kind in "iu" and d.get("quantization", (0, 0))[0]
           for d in inputs):
        return "int8-static"
    kinds = {np.dtype(d["dtype"]) for d in it.get_tensor_details()}
    if np.dtype(np.int8) in kinds:
        return "int8-dynamic"
    if np.dtype(np.float16) in kinds:
        return "fp16"
    return "fp32"


def tflite_source(path: str | os.PathLike, dst: Path, shown: str) -> tuple[Path, str]:
    """A checked copy of the user's ``.tflite`` and its precision."""
    import shutil

    src = Path(path)
    if not src.is_file():
        raise InputError(f"{shown}: no such file")
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as e:
        raise InputError("packing a .tflite needs ai-edge-litert "
                         "(pip install 'edgeship[tflite]')") from e
    try:
        Interpreter(model_path=str(src)).allocate_tensors()
    except Exception as e:  # noqa: BLE001 - flatbuffer errors, unknown ops
        raise InputError(f"{shown}: LiteRT cannot load it: {first_line(e)}") from e
    shutil.copyfile(src, dst)
    return dst, detect_precision(dst)


def source_makers(source: Path, precision: str, calib: Samples | None) -> dict:
    """The given file as its own variant; from an fp32 file, quantized ones too."""
    own = PRECISION_VARIANT[precision]
    makers = {own: lambda work: (source, {"source": "the given .tflite"})}
    if precision != "fp32":
        return makers

    def quantized(vid: str):
        def make(work: Path):
            if not _quantizer_available():
                raise VariantSkipped("needs ai-edge-quantizer (pip install "
                            "'edgeship[tflite-convert]')")
            if vid == "tflite-int8" and calib is None:
                raise VariantSkipped("needs calibration data (--calib)")
            return quantize_tflite(source, vid, calib, work / f"{vid}.tflite"), {}
        return make

    for vid in ("tflite-fp16", "tflite-int8-dynamic", "tflite-int8"):
        makers[vid] = quantized(vid)
    return makers


def _quantizer_available() -> bool:
    try:
        import ai_edge_quantizer  # noqa: F401
    except ImportError:
        return False
    return True
