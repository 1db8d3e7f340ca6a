"""Loading what users hand the converter: models, calibration/validation data, profiles.

Every failure is a :class:`~converter.errors.InputError` whose message is one line naming
the file and what is wrong with it; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import importlib
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeship.converter.errors import InputError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
MAX_DATA_SAMPLES = 100_000


# --- models --------------------------------------------------------------------------------

def import_object(spec: str) -> Any:
    """``package.module:attr`` → the object."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"{spec!r} is not of the form package.module:name")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise InputError(f"cannot import {module_name!r}: {e}") from e
    try:
        return getattr(module, attr)
    except AttributeError as e:
        raise InputError(f"{module_name!r} has no attribute {attr!r}") from e


def load_torch_model(factory: str | None = None, weights: str | os.PathLike | None = None,
                     torchscript: str | os.PathLike | None = None,
                     exported: str | os.PathLike | None = None):
    """An ``nn.Module`` in eval mode from exactly one of the supported PyTorch inputs."""
    if torchscript is not None:
        return _load_torchscript(Path(torchscript))
    if exported is not None:
        return _load_exported(Path(exported))
    if factory is None:
        raise InputError("a PyTorch model needs --factory, --torchscript or --exported")
    model = import_object(factory)()
    if weights is not None:
        _load_weights(model, Path(weights))
    return model.eval()


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise InputError(f"{path}: no such file")


def _load_torchscript(path: Path):
    import torch

    _require_file(path)
    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{path}: not a TorchScript file ({type(e).__name__})") from e


def _load_exported(path: Path):
    import torch

    _require_file(path)
    try:
        program = torch.export.load(str(path))
        return _ExportedModule(program)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{path}: not a torch.export .pt2 file ({type(e).__name__})") \
            from e


def _exported_module_class():
    from torch import nn

    class ExportedModule(nn.Module):
        """Wraps ``ExportedProgram.module()``, which refuses ``eval()``/``train()`` (it is
        already in inference form); the inner module is not registered as a child."""

        def __init__(self, program) -> None:
            super().__init__()
            object.__setattr__(self, "program", program)  # converter.export uses it as is
            object.__setattr__(self, "_inner", program.module())

        def forward(self, *args):
            return self._inner(*args)

    return ExportedModule


def _ExportedModule(program):  # noqa: N802 - a factory standing in for a class
    return _exported_module_class()(program)


def _load_weights(model, path: Path) -> None:
    import torch

    _require_file(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{path}: not a state_dict or safetensors file "
                         f"({type(e).__name__})") from e
    try:
        model.load_state_dict(state)
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0]
        raise InputError(f"{path}: weights do not fit the model: {first}") from e


def load_onnx_model(path: str | os.PathLike, dst: Path, probe: np.ndarray) -> Path:
    """Validate an ONNX file (external data allowed) and save it self-contained at ``dst``.

    ``probe`` (one validation sample) is run once so shape mismatches surface here.
    """
    import onnx

    src = Path(path)
    _require_file(src)
    try:
        model = onnx.load(str(src), load_external_data=True)
    except Exception as e:  # noqa: BLE001 - protobuf errors, missing external data
        raise InputError(f"{src}: not a readable ONNX model ({type(e).__name__}: "
                         f"{_first_line(e)})") from e
    try:
        onnx.checker.check_model(model)
        onnx.save_model(model, str(dst), save_as_external_data=False)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{src}: invalid ONNX model: {_first_line(e)}") from e
    _probe(dst, src, probe)
    return dst


def _probe(path: Path, shown: Path, probe: np.ndarray) -> None:
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - e.g. an operator onnxruntime does not have
        raise InputError(f"{shown}: onnxruntime cannot load it: {_first_line(e)}") from e
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise InputError(f"{shown}: has {len(inputs)} inputs; the converter handles "
                         "single-input models")
    check_shape(tuple(inputs[0].shape), probe.shape, str(shown))
    try:
        session.run(None, {inputs[0].name: probe.astype(np.float32)})
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{shown}: fails on the given data: {_first_line(e)}") from e


def check_shape(expected: tuple, got: tuple, what: str) -> None:
    """Raise if ``got`` (data shape) cannot feed a model input declared as ``expected``."""
    if len(expected) != len(got) or any(
            isinstance(e, int) and e > 0 and e != g
            for e, g in zip(expected[1:], got[1:])):
        raise InputError(f"{what}: input shape {list(expected)} does not match data shape "
                         f"{list(got)}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


# --- data ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Preprocess:
    """How a folder of images becomes a float batch."""

    size: tuple[int, int] | None = None  # (height, width); None keeps the image size
    layout: str = "NCHW"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    grayscale: bool = False
    scale: float = 1.0 / 255.0  # applied before mean/std
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.layout not in ("NCHW", "NHWC"):
            raise InputError(f"layout must be NCHW or NHWC, got {self.layout!r}")


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray
    y: np.ndarray | None  # labels; None → accuracy is agreement with the source model


def load_data(spec: str | os.PathLike, preprocess: Preprocess = Preprocess()) -> Dataset:
    """``.npy``, ``.npz`` (arrays ``x`` and optional ``y``), an image folder, or
    ``package.module:callable`` yielding batches (``x`` or ``(x, y)``)."""
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        return load_image_folder(path, preprocess)
    if path.suffix in (".npy", ".npz"):
        return _load_numpy(path)
    if ":" in text and not path.exists():
        return _load_callable(text)
    raise InputError(f"{text}: no such data file or folder (want .npy, .npz, an image "
                     "folder or package.module:callable)")


def _load_numpy(path: Path) -> Dataset:
    _require_file(path)
    try:
        if path.suffix == ".npy":
            return _dataset(np.load(path, allow_pickle=False), None, path)
        with np.load(path, allow_pickle=False) as npz:
            if "x" not in npz.files:
                raise InputError(f"{path}: .npz needs an array named 'x' (has "
                                 f"{sorted(npz.files)})")
            return _dataset(npz["x"], npz["y"] if "y" in npz.files else None, path)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise InputError(f"{path}: not a readable numpy file ({_first_line(e)})") from e


def _dataset(x: np.ndarray, y: np.ndarray | None, source) -> Dataset:
    if x.ndim < 2 or len(x) == 0:
        raise InputError(f"{source}: data must be a non-empty batch, got shape {x.shape}")
    x = np.ascontiguousarray(x[:MAX_DATA_SAMPLES], dtype=np.float32)
    if y is not None:
        y = np.asarray(y).astype(np.int64)[:MAX_DATA_SAMPLES]
        if y.shape != (len(x),):
            raise InputError(f"{source}: {len(x)} samples but labels of shape {y.shape}")
    return Dataset(x, y)


def _load_callable(spec: str) -> Dataset:
    fn: Callable = import_object(spec)
    xs, ys = [], []
    for batch in fn():
        x, y = batch if isinstance(batch, tuple) else (batch, None)
        xs.append(np.asarray(x))
        if y is not None:
            ys.append(np.asarray(y))
    if not xs:
        raise InputError(f"{spec}: yielded no batches")
    labels = np.concatenate(ys) if ys and len(ys) == len(xs) else None
    return _dataset(np.concatenate(xs), labels, spec)


def load_image_folder(root: Path, pre: Preprocess) -> Dataset:
    """Images under ``root`` (or ``root/<label>/``: sub-folder names sorted → label ids)."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)})")
    classes = sorted({p.parent.name for p in files if p.parent != root})
    x = np.stack([_image(p, pre) for p in files[:MAX_DATA_SAMPLES]])
    y = None
    if classes and all(p.parent != root for p in files):
        y = np.array([classes.index(p.parent.name) for p in files[:MAX_DATA_SAMPLES]])
    return _dataset(x, y, root)


def _image(path: Path, pre: Preprocess) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError as e:
        raise InputError("image folders need Pillow (pip install 'edgeship[converter]')") \
            from e
    try:
        with Image.open(path) as img:
            img = img.convert("L" if pre.grayscale else "RGB")
            if pre.size is not None:
                img = img.resize((pre.size[1], pre.size[0]), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) * pre.scale
    except OSError as e:
        raise InputError(f"{path}: not a readable image ({_first_line(e)})") from e
    arr = arr[..., None] if arr.ndim == 2 else arr
    arr = (arr - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    if pre.layout == "NCHW":
        arr = arr.transpose(2, 0, 1)
    return arr.astype(pre.dtype)
