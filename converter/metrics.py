"""Comparing a variant's outputs with the source model's, output by output (pure).

Like optimum's ``validate_model_outputs``, every named output is checked (shape, max abs
diff, cosine, SNR); a top-1 agreement is added where it means something for the task:
the class of a classifier, each step of a sequence model, each pixel of a segmenter.
Integer and boolean outputs (indices, counts, masks) are compared for exact equality.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from edgeship.converter.errors import EvaluationError
from edgeship.converter.samples import Outputs, TensorInfo

TASKS = ("classification", "detection", "segmentation", "embedding", "sequence",
         "regression", "generic")
#: Tasks whose gate includes an argmax agreement, and on which outputs.
ARGMAX_TASKS = ("classification", "sequence", "segmentation")
MAX_SNR_DB = 200.0  # identical outputs: reported as this instead of infinity


@dataclass(frozen=True)
class OutputMetrics:
    name: str
    shape_ok: bool
    max_abs_diff: float
    cosine: float  # mean over samples of the cosine of the flattened output
    cosine_min: float
    snr_db: float  # 10·log10(Σ ref² / Σ (out − ref)²), capped at MAX_SNR_DB
    agreement: float | None = None  # argmax (task outputs) or exact-equality fraction
    exact: bool = False  # an integer/boolean output, compared for equality

    def to_dict(self) -> dict:
        d = {"name": self.name, "shape_ok": self.shape_ok,
             "max_abs_diff": _r(self.max_abs_diff), "cosine": _r(self.cosine),
             "cosine_min": _r(self.cosine_min), "snr_db": _r(self.snr_db, 3),
             "exact": self.exact}
        if self.agreement is not None:
            d["agreement"] = _r(self.agreement)
        return d


def _r(v: float, digits: int = 6) -> float:
    return round(float(v), digits) if math.isfinite(v) else float(v)


def argmax_axis(task: str, j: int, ref: np.ndarray, first_float: int) -> int | None:
    """The class axis of output ``j`` (one sample's array ``ref``) for ``task``, or None
    where an argmax means nothing."""
    if task not in ARGMAX_TASKS or ref.dtype.kind != "f" or ref.ndim == 0:
        return None
    if task == "classification":
        return -1 if j == first_float and ref.shape[-1] > 1 else None
    if task == "sequence":
        return -1 if j == first_float and ref.ndim >= 2 and ref.shape[-1] > 1 else None
    if ref.ndim < 3 or j != first_float:  # segmentation: [N, C, H, W] or [N, H, W, C]
        return None
    spatial_last = ref.shape[-1] >= ref.shape[1]
    return 1 if spatial_last and ref.shape[1] > 1 else -1


def attention_masks(feeds) -> list[np.ndarray | None]:
    """Per sample, the token mask of a transformer (an integer/boolean input named like
    ``attention_mask``): outputs at masked (padding) positions mean nothing and are left
    out of every comparison."""
    masks: list[np.ndarray | None] = []
    for feed in feeds:
        found = None
        for name, value in feed.items():
            if "mask" in name.lower() and value.dtype.kind in "biu" and value.ndim >= 2:
                found = value != 0
                break
        masks.append(found)
    return masks


def _masked(a: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    if mask is None or a.ndim <= mask.ndim or a.shape[:mask.ndim] != mask.shape:
        return a
    return a[mask]


def compare(outputs: Outputs, reference: Outputs, task: str,
            masks: Sequence[np.ndarray | None] = ()) -> tuple[OutputMetrics, ...]:
    """Per-output metrics of ``outputs`` against ``reference`` (same samples, same order);
    ``masks`` (per sample, see :func:`attention_masks`) select the positions compared."""
    if len(outputs) != len(reference):
        raise EvaluationError(f"{len(outputs)} output samples but {len(reference)} reference")
    if len(outputs.names) != len(reference.names):
        raise EvaluationError(f"variant has {len(outputs.names)} outputs, the source "
                              f"{len(reference.names)} ({list(reference.names)})")
    first_float = next((j for j in range(len(reference.names))
                        if reference.per_sample and
                        reference.per_sample[0][j].dtype.kind == "f"), -1)
    masks = list(masks) or [None] * len(reference)
    result = []
    for j, name in enumerate(reference.names):
        axis = argmax_axis(task, j, reference.per_sample[0][j], first_float) \
            if reference.per_sample else None
        got, ref = outputs.output(j), reference.output(j)
        if any(g.shape != r.shape for g, r in zip(got, ref)):
            result.append(_compare_one(name, got, ref, axis))
            continue
        m0 = masks[0]
        if axis is not None and axis >= 0 and m0 is not None and \
                _masked(ref[0], m0) is not ref[0]:
            axis -= m0.ndim - 1  # the masked leading axes became one
        result.append(_compare_one(name, [_masked(g, m) for g, m in zip(got, masks)],
                                   [_masked(r, m) for r, m in zip(ref, masks)], axis))
    return tuple(result)


def _compare_one(name: str, got: Sequence[np.ndarray], ref: Sequence[np.ndarray],
                 axis: int | None) -> OutputMetrics:
    if any(g.shape != r.shape for g, r in zip(got, ref)):
        return OutputMetrics(name, False, math.inf, 0.0, 0.0, 0.0, 0.0 if axis is not None
                             else None, ref[0].dtype.kind != "f")
    exact = ref[0].dtype.kind != "f"
    cos, diff, sig, noise, agree, total = [], 0.0, 0.0, 0.0, 0, 0
    for g, r in zip(got, ref):
        a, b = g.astype(np.float64).ravel(), r.astype(np.float64).ravel()
        if a.size:
            diff = max(diff, float(np.abs(a - b).max()))
        sig += float(b @ b)
        noise += float((a - b) @ (a - b))
        cos.append(_cosine(a, b))
        if exact:
            agree, total = agree + int((a == b).sum()), total + a.size
        elif axis is not None and g.ndim:
            agree += int((g.argmax(axis) == r.argmax(axis)).sum())
            total += r.argmax(axis).size
    snr = MAX_SNR_DB if noise == 0 else min(MAX_SNR_DB, 10 * math.log10(
        max(sig, 1e-300) / noise))
    agreement = agree / total if total else (None if axis is None and not exact else 1.0)
    return OutputMetrics(name, True, diff, float(np.mean(cos)) if cos else 1.0,
                         float(np.min(cos)) if cos else 1.0, snr, agreement, exact)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if (na == 0 and nb == 0) or np.array_equal(a, b):
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return max(-1.0, min(1.0, float(a @ b) / (na * nb)))


def top1_accuracy(outputs: Outputs, labels: np.ndarray, j: int = 0) -> float:
    """Top-1 accuracy of output ``j`` (argmax over its last axis) against ``labels``."""
    hits = total = 0
    for k, sample in enumerate(outputs.per_sample):
        pred = np.asarray(sample[j]).argmax(-1).reshape(-1)
        want = np.asarray(labels[k]).reshape(-1)
        if pred.size != want.size:
            raise EvaluationError(f"labels of sample {k} hold {want.size} values but the "
                                  f"model makes {pred.size} predictions")
        hits += int((pred == want).sum())
        total += pred.size
    return hits / total if total else 0.0


def infer_task(inputs: Sequence[TensorInfo], outputs: Sequence[TensorInfo],
               labels: np.ndarray | None = None) -> str:
    """A best guess at the task from the signature (``--task`` overrides it)."""
    task = _task_from_signature(inputs, outputs)
    if labels is not None and np.asarray(labels).dtype.kind in "iub" and \
            task not in ("sequence", "segmentation"):
        return "classification"  # integer labels: one class per sample
    return task


def _task_from_signature(inputs: Sequence[TensorInfo], outputs: Sequence[TensorInfo]) -> str:
    floats = [o for o in outputs if o.dtype.startswith("float")]
    image_in = any(i.rank == 4 and i.dtype.startswith("float") for i in inputs)
    tokens_in = any(i.dtype.startswith("int") and i.rank == 2 for i in inputs)
    if len(outputs) == 1 and floats and floats[0].rank == 2:
        last = floats[0].shape[-1]
        if tokens_in:
            return "embedding"
        if image_in and (last is None or last > 1):
            return "classification"
    if tokens_in and floats and floats[0].rank == 3:
        return "embedding"
    if len(floats) == 1 and floats[0].rank == 3 and floats[0].shape[1] is None and \
            floats[0].shape[2] is not None:
        return "sequence"  # [N, steps (dynamic), classes (fixed)]: OCR, speech, taggers
    if image_in and len(floats) == 1 and floats[0].rank == 4:
        return "segmentation"
    if image_in and floats and all(o.rank == 3 for o in floats):
        return "detection"
    return "generic"
