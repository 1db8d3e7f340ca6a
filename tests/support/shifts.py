"""Shifted digits for the quality tests and bench-quality, and serving a bundle in-process.

Covariate shifts (the images change, the labels' meaning does not): rotation, Gaussian
noise, blur. Label shift (the class mix changes) and concept drift (the labels' meaning
changes) are here too, to show what the label-free estimate cannot see.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def rotate(x: np.ndarray, degrees: float) -> np.ndarray:
    from scipy import ndimage

    out = ndimage.rotate(x, degrees, axes=(-1, -2), reshape=False, order=1, mode="constant")
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def noise(x: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(x + rng.normal(0.0, sigma, x.shape), 0.0, 1.0).astype(np.float32)


def blur(x: np.ndarray, sigma: float) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(x, sigma=(0, 0, sigma, sigma)).astype(np.float32)


COVARIATE = {"rotation": rotate, "noise": noise, "blur": blur}


def label_shift(x: np.ndarray, y: np.ndarray, classes: tuple[int, ...]
                ) -> tuple[np.ndarray, np.ndarray]:
    """Only the given classes (the class mix changes, each image does not)."""
    keep = np.isin(y, classes)
    return x[keep], y[keep]


def concept_drift(y: np.ndarray, seed: int = 0) -> np.ndarray:
    """The same images mean other classes now (a permutation of the labels)."""
    perm = np.random.default_rng(seed).permutation(int(y.max()) + 1)
    return perm[y]


def serve_bundle(bundle_dir: Path, variant_id: str = "onnx-fp32", *, quality: Any = None,
                 server: Any = None) -> Any:
    """A ModelServer serving a bundle's variant as the agent does, with ``quality`` (a
    QualityHub) plugged in when given."""
    from edgeship.agent.manifest import MANIFEST_NAME, Manifest
    from edgeship.agent.runtime import load_runtime
    from edgeship.agent.serving import LoadedModel, ModelServer
    from edgeship.agent.store import InstalledModel

    bundle_dir = Path(bundle_dir)
    manifest = Manifest.from_bytes((bundle_dir / MANIFEST_NAME).read_bytes())
    variant = manifest.variant(variant_id)
    if server is None:
        server = ModelServer()
        server.quality = quality
    inst = InstalledModel(manifest.model, manifest.version, variant, manifest, bundle_dir)
    runtime = load_runtime(variant.runtime, bundle_dir / variant.file, threads=1)
    server.swap(LoadedModel(inst, runtime))
    return server
