"""Loading what users hand the converter: models, calibration/validation data, profiles.

Every failure is a :class:`~converter.errors.InputError` whose message is one line naming
the file and what is wrong with it; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeship.converter.errors import InputError
from edgeship.converter.samples import RawData, first_line, load_npz_arrays

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


def check_shape(expected: tuple, got: tuple, what: str) -> None:
    """Raise if ``got`` (data shape) cannot feed a model input declared as ``expected``."""
    if len(expected) != len(got) or any(
            isinstance(e, int) and e > 0 and e != g
            for e, g in zip(expected[1:], got[1:])):
        raise InputError(f"{what}: input shape {list(expected)} does not match data shape "
                         f"{list(got)}")


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


def load_data(spec: str | os.PathLike, preprocess: Preprocess = Preprocess()) -> RawData:
    """``.npy``, ``.npz`` (one array per input name, or ``x``; optional labels ``y``), an
    image folder, or ``package.module:callable`` yielding batches (``x`` or ``(x, y)``).
    Arrays are kept as stored; matching them to a model's inputs happens later."""
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        return load_image_folder(path, preprocess)
    if path.suffix in (".npy", ".npz"):
        _require_file(path)
        arrays, y = load_npz_arrays(path)
        arrays = {k: v[:MAX_DATA_SAMPLES] for k, v in arrays.items()}
        return _raw(arrays, y, text)
    if ":" in text and not path.exists():
        return _load_callable(text)
    raise InputError(f"{text}: no such data file or folder (want .npy, .npz, an image "
                     "folder or package.module:callable)")


def _raw(arrays: dict[str, np.ndarray], y, source) -> RawData:
    for name, a in arrays.items():
        if a.ndim == 0 or len(a) == 0:
            raise InputError(f"{source}: array {name!r} must hold samples on its first "
                             f"axis, got shape {list(a.shape)}")
    if y is not None:
        y = np.asarray(y)[:MAX_DATA_SAMPLES]
        n = len(next(iter(arrays.values())))
        if len(y) != n:
            raise InputError(f"{source}: {n} samples but {len(y)} labels in 'y'")
    return RawData(arrays, y, str(source))


def _load_callable(spec: str) -> RawData:
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
    return _raw({"x": np.concatenate(xs)[:MAX_DATA_SAMPLES]}, labels, spec)


def load_image_folder(root: Path, pre: Preprocess) -> RawData:
    """Images under ``root`` (or ``root/<label>/``: sub-folder names sorted → label ids)."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)})")
    classes = sorted({p.parent.name for p in files if p.parent != root})
    x = np.stack([_image(p, pre) for p in files[:MAX_DATA_SAMPLES]])
    y = None
    if classes and all(p.parent != root for p in files):
        y = np.array([classes.index(p.parent.name) for p in files[:MAX_DATA_SAMPLES]])
    return _raw({"x": x}, y, root)


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
        raise InputError(f"{path}: not a readable image ({first_line(e)})") from e
    arr = arr[..., None] if arr.ndim == 2 else arr
    arr = (arr - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    if pre.layout == "NCHW":
        arr = arr.transpose(2, 0, 1)
    return arr.astype(pre.dtype)
