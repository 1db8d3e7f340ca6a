"""The golden file: inputs and each variant's outputs, keyed by tensor name, bounded in size.

``golden.npz`` (format 2) holds, for K samples:

- ``in:<input name>``: the samples of one input, stacked ``(K, *sample_shape)``;
- or, for an input too large to store, ``pattern:<input name>`` = ``[lo, hi, seed]`` and
  ``shape:<input name>``: the device regenerates the same values with :func:`pattern`
  (integer hashing, bit-exact on every platform);
- ``out:<variant>:<output name>``: that variant's outputs on those samples, stacked; an
  output too large to store whole keeps every ``stride``-th element of each sample
  (``stride:<variant>:<name>``, full shape in ``shape:<variant>:<name>``).

The whole file stays under :func:`budget_bytes` (the larger of 1 MB and 10 % of the
model). Format 1 (``inputs`` + one array per variant id: first input and first output
only) is still read. Pure apart from :func:`load_golden` reading the file.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from edgeship.agent.errors import HealthCheckError, Reason

FORMAT_KEY = "__format__"
MIN_BUDGET_BYTES = 1_000_000
BUDGET_FRACTION = 0.10
HEADER_RESERVE_BYTES = 32_768  # zip/npy headers of the members
MAX_GOLDEN_BYTES = 64 * 1024 * 1024  # a device never parses more than this


def budget_bytes(model_bytes: int) -> int:
    """Golden files are at most the larger of 1 MB and 10 % of the model."""
    return max(MIN_BUDGET_BYTES, int(BUDGET_FRACTION * model_bytes))


def pattern(shape: Sequence[int], dtype: str, lo: float, hi: float, seed: int) -> np.ndarray:
    """Deterministic values in [lo, hi] of ``dtype``: the same bits on every platform
    (a multiplicative hash of the element index; no random generator involved)."""
    n = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
    i = np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = (i * np.uint64(2654435761) + np.uint64(seed) * np.uint64(40503)) \
            % np.uint64(1 << 32)
    u = h.astype(np.float64) / float(1 << 32)
    dt = np.dtype(dtype)
    values: np.ndarray
    if dt.kind == "b":
        values = u < 0.5
    elif dt.kind in "iu":
        values = np.floor(lo + u * (hi - lo + 1)).clip(lo, hi)
    else:
        values = lo + u * (hi - lo)
    return values.astype(dt).reshape(tuple(shape))


@dataclass
class Golden:
    """What a health check feeds and expects (for one variant)."""

    feeds: list[dict[str, np.ndarray]]
    expected: dict[str, np.ndarray]  # output name -> (K, ...) stored values
    strides: dict[str, int] = field(default_factory=dict)  # output -> stride (strided only)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # full per-sample shape
    batched: bool = False  # format 1: one feed holding a batch of samples

    def one_sample(self) -> dict[str, np.ndarray]:
        """The feed the latency is timed on: the first sample."""
        feed = self.feeds[0]
        return {k: v[:1] for k, v in feed.items()} if self.batched else feed

    def __len__(self) -> int:
        return len(self.feeds)


def pack(inputs: Mapping[str, np.ndarray], patterns: Mapping[str, tuple[tuple, float, float,
                                                                          int]],
         outputs: Mapping[str, Mapping[str, Sequence[np.ndarray]]],
         budget: int) -> dict[str, np.ndarray]:
    """The arrays of a format-2 golden file. ``inputs``: stacked samples per input name;
    ``patterns``: name -> (sample shape, lo, hi, seed) for inputs not stored; ``outputs``:
    variant -> output name -> per-sample arrays. Outputs are strided to fit ``budget``."""
    arrays: dict[str, np.ndarray] = {FORMAT_KEY: np.array([2], np.int64)}
    for name, value in inputs.items():
        arrays[f"in:{name}"] = np.require(value, requirements="C")
    for name, (shape, lo, hi, seed) in patterns.items():
        arrays[f"pattern:{name}"] = np.array([lo, hi, seed], np.float64)
        arrays[f"shape:{name}"] = np.array(shape, np.int64)
    used = sum(a.nbytes for a in arrays.values()) + HEADER_RESERVE_BYTES
    slots = sum(len(v) for v in outputs.values()) or 1
    share = max(1024, (budget - used) // slots)
    for variant, by_name in outputs.items():
        for name, samples in by_name.items():
            arrays.update(_pack_output(variant, name, list(samples), share))
    return arrays


def _pack_output(variant: str, name: str, samples: list[np.ndarray],
                 share: int) -> dict[str, np.ndarray]:
    key = f"out:{variant}:{name}"
    shapes = {s.shape for s in samples}
    total = sum(s.nbytes for s in samples)
    if len(shapes) == 1 and total <= share:
        return {key: np.stack(samples)}
    shape = samples[0].shape
    if len(shapes) != 1:  # data-dependent shapes: keep the first sample only
        samples = samples[:1]
        total = samples[0].nbytes
    stride = max(1, math.ceil(total / share))
    flat = np.stack([s.reshape(-1)[::stride] for s in samples])
    return {key: flat, f"stride:{variant}:{name}": np.array(stride, np.int64),
            f"shape:{variant}:{name}": np.array(shape, np.int64)}


def load_golden(path: Path, variant_id: str, input_specs: Sequence, output_names:
                Sequence[str]) -> Golden:
    """The health check's feeds and expectations for ``variant_id`` (format 1 or 2)."""
    if path.stat().st_size > MAX_GOLDEN_BYTES:
        raise HealthCheckError(f"golden file {path.name} is too large",
                               reason_code=Reason.BUNDLE_INVALID)
    try:
        with np.load(path, allow_pickle=False) as data:
            if FORMAT_KEY not in data.files:
                return _format1(data, variant_id, input_specs, output_names)
            return _format2(data, variant_id, input_specs, output_names)
    except (KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise HealthCheckError(f"golden file unusable for {variant_id}: {e}",
                               reason_code=Reason.BUNDLE_INVALID) from e


def _format1(data, variant_id: str, input_specs, output_names) -> Golden:
    spec = input_specs[0]
    x = np.asarray(data["inputs"]).astype(spec.dtype)
    return Golden([{spec.name: x}], {output_names[0]: np.asarray(data[variant_id])[None]},
                  batched=True)


def _format2(data, variant_id: str, input_specs, output_names) -> Golden:
    stacked: dict[str, np.ndarray] = {}
    count = None
    for spec in input_specs:
        if f"in:{spec.name}" in data.files:
            stacked[spec.name] = np.asarray(data[f"in:{spec.name}"])
            count = len(stacked[spec.name])
    feeds: list[dict[str, np.ndarray]] = [{} for _ in range(count or 1)]
    for spec in input_specs:
        if spec.name in stacked:
            for k, feed in enumerate(feeds):
                feed[spec.name] = np.require(stacked[spec.name][k], requirements="C")
            continue
        lo, hi, seed = (float(v) for v in data[f"pattern:{spec.name}"])
        value = pattern(tuple(int(d) for d in data[f"shape:{spec.name}"]), spec.dtype, lo,
                        hi, int(seed))
        for feed in feeds:
            feed[spec.name] = value
    golden = Golden(feeds, {})
    for name in output_names:
        golden.expected[name] = np.asarray(data[f"out:{variant_id}:{name}"])
        if f"stride:{variant_id}:{name}" in data.files:
            golden.strides[name] = int(data[f"stride:{variant_id}:{name}"])
            golden.shapes[name] = tuple(int(d) for d in data[f"shape:{variant_id}:{name}"])
    return golden


@dataclass(frozen=True)
class OutputCheck:
    name: str
    max_abs_diff: float
    atol: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.atol


def compare(golden: Golden, got: Sequence[Sequence[np.ndarray]],
            tolerances: Mapping[str, float], output_names: Sequence[str]) -> list[OutputCheck]:
    """Every output of every sample against the golden values; raises HealthCheckError for
    a wrong shape or non-finite values, returns the per-output differences."""
    checks = []
    for j, name in enumerate(output_names):
        want = golden.expected[name]
        worst = 0.0
        for k in range(min(len(got), len(want))):
            value = np.asarray(got[k][j])
            _check_shape(name, value, want[k], golden)
            if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
                raise HealthCheckError(f"output {name} holds NaN or infinite values",
                                       reason_code=Reason.NONFINITE_OUTPUT)
            stride = golden.strides.get(name)
            seen = value.reshape(-1)[::stride] if stride else value
            if seen.size:
                worst = max(worst, float(np.max(np.abs(
                    seen.astype(np.float64) - want[k].astype(np.float64)))))
        checks.append(OutputCheck(name, worst, float(tolerances[name])))
    return checks


def _check_shape(name: str, value: np.ndarray, want: np.ndarray, golden: Golden) -> None:
    expected = golden.shapes.get(name, want.shape)
    if name in golden.strides:
        ok = tuple(value.shape) == tuple(expected)
    else:
        ok = value.shape == want.shape
    if not ok:
        raise HealthCheckError(f"output {name} has shape {list(value.shape)}, golden "
                               f"{list(expected)}", reason_code=Reason.OUTPUT_SHAPE_MISMATCH)
