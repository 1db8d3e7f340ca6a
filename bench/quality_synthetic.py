"""Label-free estimates fitted on synthetic shifts (tried for the estimate; not kept).

``python -m bench.quality_synthetic``: in the style of Deng & Zheng (CVPR 2021), perturb the
validation inputs with generic shifts that are NOT the bench's evaluation shifts (contrast
toward each sample's mean, mixup with another sample, element dropout, a roll along the
last axis, cutout), run each variant on them, fit an estimator to those (shifted set →
true accuracy) pairs, and score it on the bench's rotation / noise / blur cases, which are
never used to fit. Printed beside ATC and DoC fitted on the validation set alone, and the
weight between ATC and DoC fitted with each synthetic family left out in turn (how stable
the fit is). Only numbers; nothing here ships.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from bench.quality import SHIFTS, _cases, build

Estimate = Callable[[np.ndarray], float]


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _mean_fill(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = x.copy()
    out[mask] = x.mean()
    return out


def _cutout(x: np.ndarray, s: float) -> np.ndarray:
    flat, rng = x.reshape(len(x), -1), _rng(0)
    width = int(round(s * flat.shape[1]))
    mask = np.zeros(flat.shape, bool)
    for i, start in enumerate(rng.integers(0, flat.shape[1] - width + 1, len(x))):
        mask[i, start:start + width] = True
    return _mean_fill(x, mask.reshape(x.shape))


def _contrast(x: np.ndarray, s: float) -> np.ndarray:
    m = x.reshape(len(x), -1).mean(1).reshape(-1, *([1] * (x.ndim - 1)))
    return (m + (x - m) * (1 - s)).astype(x.dtype)


SYNTHETIC: dict[str, tuple[Callable[[np.ndarray, float], np.ndarray], list[float]]] = {
    "contrast": (_contrast, [0.2, 0.4, 0.6, 0.8]),
    "mixup": (lambda x, s: ((1 - s) * x + s * x[_rng(0).permutation(len(x))]).astype(x.dtype),
              [0.1, 0.2, 0.3, 0.4]),
    "dropout": (lambda x, s: _mean_fill(x, _rng(0).random(x.shape) < s), [0.1, 0.2, 0.3, 0.45]),
    "roll": (lambda x, s: np.roll(x, max(1, int(round(s * x.shape[-1]))), axis=-1),
             [0.1, 0.2, 0.3]),
    "cutout": (_cutout, [0.1, 0.2, 0.3, 0.4]),
}


def _probs(z: np.ndarray) -> np.ndarray:
    from edgeship.agent.quality.features import class_probabilities

    return class_probabilities(z, "logits")


def _base(ref: np.ndarray, y: np.ndarray) -> tuple[Estimate, Estimate]:
    """ATC (max probability) and DoC fitted on the validation outputs alone."""
    from edgeship.converter.profile import atc_threshold

    p = _probs(ref)
    t, acc = atc_threshold(p.max(1), p.argmax(1) == y)
    conf = float(p.max(1).mean())
    return (lambda z: float((_probs(z).max(1) > t).mean()),
            lambda z: acc + float(_probs(z).max(1).mean()) - conf)


def fitted(ref: np.ndarray, y: np.ndarray, synthetic: list[tuple[str, np.ndarray]],
           leave_out: str = "") -> dict[str, Estimate]:
    """Estimators fitted on the synthetic sets (and the validation set itself)."""
    atc, doc = _base(ref, y)
    sets = [("validation", ref)] + [(f, z) for f, z in synthetic if f != leave_out]
    truth = np.array([(_probs(z).argmax(1) == y).mean() for _, z in sets])
    confs = [_probs(z).max(1) for _, z in sets]
    grid = np.unique(np.quantile(np.concatenate(confs), np.linspace(0.001, 0.5, 400)))
    errs = [np.mean([((c > t).mean() - a) ** 2 for c, a in zip(confs, truth)]) for t in grid]
    threshold = float(grid[int(np.argmin(errs))])
    feats = np.array([[atc(z), float(c.mean()), 1.0] for (_, z), c in zip(sets, confs)])
    w = np.linalg.lstsq(feats, truth, rcond=None)[0]
    a, d = np.array([atc(z) for _, z in sets]), np.array([doc(z) for _, z in sets])
    mix = float(np.clip((a - d) @ (truth - d) / max(1e-12, (a - d) @ (a - d)), 0, 1))
    return {"ATC, threshold fitted on synthetic": lambda z: float(
                (_probs(z).max(1) > threshold).mean()),
            "regression (ATC, mean confidence)": lambda z: float(np.clip(
                np.array([atc(z), _probs(z).max(1).mean(), 1.0]) @ w, 0, 1)),
            f"weight {mix:.2f} ATC + {1 - mix:.2f} DoC": lambda z: mix * atc(z) + (1 - mix) * doc(z)}


def _mae(est: Estimate, cases: list[tuple[str, np.ndarray, np.ndarray]]) -> str:
    errs = [(k, float((_probs(z).argmax(1) == y).mean()), est(z)) for k, z, y in cases]
    per = {k: np.mean([abs(e - a) * 100 for kk, a, e in errs if kk == k]) for k in SHIFTS}
    mild = np.mean([abs(e - a) * 100 for _, a, e in errs if a >= 0.85])
    return ", ".join(f"{k} {v:.1f}" for k, v in per.items()) + f", mild {mild:.1f}"


def run_variant(setup, variant_file: Path) -> None:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(variant_file), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def logits(x: np.ndarray) -> np.ndarray:
        return np.concatenate([sess.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])
    ref = logits(setup.x_ref)
    synthetic = [(fam, logits(fn(setup.x_ref, s))) for fam, (fn, levels) in SYNTHETIC.items()
                 for s in levels]
    cases = [(k, logits(x), y) for k, _, x, y in _cases(setup) if k in SHIFTS]
    print(f"\n{variant_file.name}: MAE in points on the bench's shifts (never fitted on)")
    atc, doc = _base(ref, setup.y_ref)
    estimators = {"ATC (validation only)": atc, "DoC (validation only)": doc,
                  **fitted(ref, setup.y_ref, synthetic)}
    for what, est in estimators.items():
        print(f"   {what:<44}{_mae(est, cases)}")
    for fam in SYNTHETIC:
        name, est = list(fitted(ref, setup.y_ref, synthetic, fam).items())[-1]
        print(f"   without {fam:<10} {name:<33}{_mae(est, cases)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.quality_synthetic",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=15)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-quality-synthetic-") as tmp:
        setup = build(Path(tmp), args.epochs)
        for f in ("model.fp32.onnx", "model.int8.onnx"):
            run_variant(setup, setup.bundle / f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
