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


def renumber_bundle(src: Path, dst: Path, version: int) -> Path:
    """A copy of a bundle as another version of the same model (same files)."""
    import json
    import shutil

    from edgeship.agent.manifest import MANIFEST_NAME

    shutil.copytree(src, dst)
    doc = json.loads((dst / MANIFEST_NAME).read_text())
    doc["version"] = version
    (dst / MANIFEST_NAME).write_text(json.dumps(doc, indent=2, sort_keys=True))
    return dst


class Traffic:
    """Inference on in-process agents (``agent.server``, what their local API calls) until
    stopped. ``source(i)`` gives agent i's next (input batch, true labels or None); with
    labels, the ids and labels go back as feedback over the agent's local API in batches
    of ``feedback_batch``. ``pause_s`` between rounds over all agents."""

    def __init__(self, agents: list, model: str, source, *, pause_s: float = 0.002,
                 feedback_batch: int = 50) -> None:
        import threading

        self.agents, self.model, self.source = agents, model, source
        self.pause_s, self.feedback_batch = pause_s, feedback_batch
        self.sent = [0] * len(agents)
        self.labelled = [0] * len(agents)
        self._pending: list[list[dict]] = [[] for _ in agents]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from edgeship.agent.errors import EdgeshipError

        while not self._stop.wait(self.pause_s):
            for i, agent in enumerate(self.agents):
                x, y = self.source(i)
                try:
                    _, _, rid = agent.server.predict_tracked(self.model, x)
                except EdgeshipError:
                    continue  # not serving yet
                self.sent[i] += 1
                if y is not None and rid is not None:
                    self._label(i, agent, rid, y)

    def _label(self, i: int, agent: Any, rid: str, y: np.ndarray) -> None:
        from edgeship.agent.client import AgentClient

        self._pending[i].append({"id": rid, "labels": [int(v) for v in y]})
        if len(self._pending[i]) < self.feedback_batch or agent.api is None:
            return
        items, self._pending[i] = self._pending[i], []
        with AgentClient(agent.api.url) as client:
            doc = client.feedback(self.model, items)
        self.labelled[i] += doc["accepted"]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
