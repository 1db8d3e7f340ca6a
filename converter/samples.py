"""Samples for models with any number of inputs of any dtype, and running a model on them.

A :class:`Samples` holds one array per input name whose first axis indexes samples:
sample ``k`` is ``{name: array[k]}``, fed exactly as stored (so a scalar input is an array
of shape ``(K,)`` and a state tensor whose batch axis is not the first keeps its layout).
Rows of a plain batch (``x`` of shape ``(N, C, H, W)``) become samples of batch 1.

Models run sample by sample (:func:`run_samples`), which works for fixed batch sizes,
data-dependent output shapes and inputs with unrelated batch axes alike.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from edgeship.converter.errors import EvaluationError, InputError

logger = logging.getLogger(__name__)

#: Stored reference outputs are capped: a conversion keeps at most this many bytes of them.
MAX_REFERENCE_BYTES = 1 << 30


@dataclass(frozen=True)
class TensorInfo:
    """A model input or output: name, numpy dtype name and shape (None = dynamic)."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]
    dim_names: tuple[str | None, ...] = ()

    @property
    def rank(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class Samples:
    """Per-input arrays ``(K, *sample_shape)`` and optional labels ``y`` (K,)."""

    arrays: Mapping[str, np.ndarray]
    y: np.ndarray | None = None
    synthesized: bool = False  # made up from the model's signature: no accuracy measured
    source: str = ""

    def __post_init__(self) -> None:
        counts = {len(a) for a in self.arrays.values()}
        if len(counts) > 1:
            sizes = {n: len(a) for n, a in self.arrays.items()}
            raise InputError(f"{self.source or 'data'}: arrays hold different numbers of "
                             f"samples {sizes}")
        if not self.arrays or not counts or counts == {0}:
            raise InputError(f"{self.source or 'data'}: no samples")

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.arrays)

    def feed(self, k: int) -> dict[str, np.ndarray]:
        return {n: np.require(a[k], requirements="C") for n, a in self.arrays.items()}

    def feeds(self) -> Iterator[dict[str, np.ndarray]]:
        for k in range(len(self)):
            yield self.feed(k)

    def take(self, n: int) -> "Samples":
        return Samples({k: a[:n] for k, a in self.arrays.items()},
                       None if self.y is None else self.y[:n], self.synthesized, self.source)

    def sample_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.arrays[name].shape[1:])

    @classmethod
    def from_rows(cls, name: str, x: np.ndarray, y: np.ndarray | None = None,
                  source: str = "") -> "Samples":
        """A plain batch: row ``k`` becomes the sample ``{name: x[k:k+1]}``."""
        return cls({name: np.asarray(x)[:, None]}, y, source=source)


@dataclass(frozen=True)
class Outputs:
    """A model's outputs on a set of samples: ``per_sample[k][j]`` is output ``names[j]``."""

    names: tuple[str, ...]
    per_sample: list[tuple[np.ndarray, ...]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.per_sample)

    def output(self, j: int) -> list[np.ndarray]:
        return [s[j] for s in self.per_sample]

    def stacked(self, j: int) -> np.ndarray | None:
        """Output ``j`` of every sample stacked on a new first axis; None if shapes vary."""
        arrays = self.output(j)
        if len({a.shape for a in arrays}) != 1:
            return None
        return np.stack(arrays)


# --- running a model ----------------------------------------------------------------------

RunFn = Callable[[dict[str, np.ndarray]], Sequence[np.ndarray]]


def run_samples(run: RunFn, samples: Samples, names: Sequence[str],
                what: str = "model") -> Outputs:
    """``run`` on every sample, one at a time; a failure names the sample and the cause."""
    out: list[tuple[np.ndarray, ...]] = []
    budget = MAX_REFERENCE_BYTES
    for k, feed in enumerate(samples.feeds()):
        try:
            result = tuple(np.asarray(o) for o in run(feed))
        except Exception as e:  # noqa: BLE001 - runtimes raise their own types
            shapes = {n: list(a.shape) for n, a in feed.items()}
            raise EvaluationError(f"{what} fails on sample {k} (shapes {shapes}): "
                                  f"{first_line(e)}") from e
        budget -= sum(o.nbytes for o in result)
        if budget < 0 and k > 0:
            logger.warning("outputs of %s take over %d MiB: using the first %d samples",
                           what, MAX_REFERENCE_BYTES >> 20, k)
            break
        out.append(result)
    return Outputs(tuple(names), out)


def first_line(e: BaseException, limit: int = 300) -> str:
    """One line of an exception's text (foreign tools print pages), without ANSI codes."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(e)).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line[:limit] if line else type(e).__name__


# --- data files keyed by input name -------------------------------------------------------

def samples_for(inputs: Sequence[TensorInfo], arrays: Mapping[str, np.ndarray],
                y: np.ndarray | None, source: str) -> Samples:
    """Match the arrays of a data file to the model's inputs.

    An array named after an input with one axis more than the input is per-sample
    (``array[k]`` is fed); with the input's own rank it is a plain batch (``array[k:k+1]``).
    A single-input model also takes the legacy names ``x`` / ``.npy``.
    """
    arrays = dict(arrays)
    if len(inputs) == 1 and inputs[0].name not in arrays and "x" in arrays:
        arrays[inputs[0].name] = arrays.pop("x")
    missing = [i.name for i in inputs if i.name not in arrays]
    if missing:
        raise InputError(f"{source}: no array for model input(s) {missing} (has "
                         f"{sorted(arrays)}; an .npz needs one array per input name)")
    extra = sorted(set(arrays) - {i.name for i in inputs})
    if extra:
        raise InputError(f"{source}: arrays {extra} match no model input (inputs: "
                         f"{[i.name for i in inputs]}; labels go in 'y')")
    out = {i.name: _as_samples(i, arrays[i.name], source) for i in inputs}
    if y is not None:
        y = np.asarray(y)
        n = len(next(iter(out.values())))
        if len(y) != n:
            raise InputError(f"{source}: {n} samples but {len(y)} labels in 'y'")
    return Samples(out, y, source=source)


def _as_samples(spec: TensorInfo, array: np.ndarray, source: str) -> np.ndarray:
    a = np.asarray(array)
    if a.ndim == spec.rank + 1:
        per_sample = a
    elif a.ndim == spec.rank and spec.rank >= 1:
        per_sample = a[:, None]
    else:
        raise InputError(f"{source}: array {spec.name!r} has shape {list(a.shape)} but the "
                         f"input is {shape_text(spec.shape)} (store samples on a new first "
                         "axis, or rows of a batch)")
    if len(per_sample) == 0:
        raise InputError(f"{source}: array {spec.name!r} holds no samples")
    fixed = [(i, d) for i, d in enumerate(spec.shape) if d is not None]
    bad = [(i, d) for i, d in fixed if per_sample.shape[1 + i] != d]
    if bad:
        raise InputError(f"{source}: samples of {spec.name!r} have shape "
                         f"{list(per_sample.shape[1:])} but the input is "
                         f"{shape_text(spec.shape)}")
    return _cast(spec, per_sample, source)


def _cast(spec: TensorInfo, a: np.ndarray, source: str) -> np.ndarray:
    want = np.dtype(spec.dtype)
    if a.dtype == want:
        return a
    if np.can_cast(a.dtype, want, casting="same_kind") or (
            a.dtype.kind in "iub" and want.kind in "iuf"):
        return a.astype(want)
    raise InputError(f"{source}: array {spec.name!r} is {a.dtype} but the input is "
                     f"{spec.dtype}")


def shape_text(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def load_npz_arrays(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Every array of an ``.npz`` (``y`` apart) or the one array of an ``.npy`` (as ``x``)."""
    import zipfile

    p = os.fspath(path)
    try:
        if p.endswith(".npy"):
            return {"x": np.load(p, allow_pickle=False)}, None
        with np.load(p, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise InputError(f"{p}: not a readable numpy file ({first_line(e)})") from e
    y = arrays.pop("y", None)
    if not arrays:
        raise InputError(f"{p}: holds no input arrays")
    return arrays, y


# --- inputs made up from the signature ----------------------------------------------------

DEFAULT_DYNAMIC_DIM = 32
SYNTH_SAMPLES = 8


def synthesize(inputs: Sequence[TensorInfo], count: int = SYNTH_SAMPLES,
               seed: int = 0) -> Samples:
    """Inputs of the right dtype and shape when the user gave no data: dynamic dims are 1
    on the first axis and 32 elsewhere; floats in [0, 1), masks all ones, type ids zero,
    other integers small non-negative values, booleans False."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in inputs:
        shape = tuple(d if d is not None else (1 if i == 0 else DEFAULT_DYNAMIC_DIM)
                      for i, d in enumerate(spec.shape))
        arrays[spec.name] = _synth(spec, (count, *shape), rng)
    return Samples(arrays, None, synthesized=True, source="synthesized inputs")


def _synth(spec: TensorInfo, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    dtype = np.dtype(spec.dtype)
    lowered = spec.name.lower()
    if dtype.kind == "b":
        return np.zeros(shape, dtype)
    if dtype.kind == "f":
        return rng.random(shape).astype(dtype)
    if "mask" in lowered:
        return np.ones(shape, dtype)
    if "type" in lowered or "segment" in lowered:
        return np.zeros(shape, dtype)
    high = 255 if dtype == np.uint8 else 100
    return rng.integers(0, high, size=shape).astype(dtype)


@dataclass(frozen=True)
class RawData:
    """Arrays as a data file holds them, before they are matched to a model's inputs."""

    arrays: Mapping[str, np.ndarray]
    y: np.ndarray | None = None
    source: str = "data"

    def rows(self) -> np.ndarray:
        """The one array of single-input data (``x``, ``.npy``, image folders, callables)."""
        if len(self.arrays) != 1:
            raise InputError(f"{self.source}: holds {len(self.arrays)} arrays "
                             f"({sorted(self.arrays)}); this source takes one input")
        return next(iter(self.arrays.values()))

    def match(self, inputs: Sequence[TensorInfo]) -> Samples:
        return samples_for(inputs, self.arrays, self.y, self.source)


def as_raw(data, y: np.ndarray | None = None, source: str = "data") -> "RawData | Samples":
    """What the pipeline accepts as data: Samples, RawData or a plain single-input batch."""
    if data is None or isinstance(data, (Samples, RawData)):
        return data
    return RawData({"x": np.asarray(data)}, y, source)
