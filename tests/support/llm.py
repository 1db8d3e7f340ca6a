"""A tiny language model for tests: trained in about a second on pydoc's language reference,
converted once per test session (onnxruntime-genai's builder runs once), and helpers to
serve a bundle's variant behind the agent's real HTTP API."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeship.agent.manifest import MANIFEST_NAME, Manifest
from edgeship.agent.store import InstalledModel

TINY_STEPS = 80


@dataclass(frozen=True)
class TinyLm:
    checkpoint: Path
    bundle: Path
    manifest: Manifest
    result: object  # converter.llm.pipeline.LlmResult


def train_tiny(out: Path, steps: int = TINY_STEPS) -> Path:
    from edgeship.converter.llm.tinylm import TrainSettings, train

    train(out, TrainSettings(size="tiny", steps=steps, batch_size=8, seq_len=64,
                             learning_rate=1e-2, threads=1))
    return out


def build_tiny(root: Path) -> TinyLm:
    from edgeship.converter.llm.evaluate import LmGate
    from edgeship.converter.llm.pipeline import LlmSettings, convert_llm

    checkpoint = train_tiny(root / "checkpoint")
    settings = LlmSettings(eval_windows=4, eval_seq_len=64,
                           gate=LmGate(max_ppl_increase=0.05, min_top1_agreement=0.8,
                                       max_mean_kl=0.05))
    result = convert_llm(str(checkpoint), root / "bundle", "tinylm", 1, settings=settings)
    manifest = Manifest.from_bytes((root / "bundle" / MANIFEST_NAME).read_bytes())
    return TinyLm(checkpoint, root / "bundle", manifest, result)


def installed(bundle: Path, variant_id: str) -> InstalledModel:
    manifest = Manifest.from_bytes((bundle / MANIFEST_NAME).read_bytes())
    return InstalledModel(manifest.model, manifest.version, manifest.variant(variant_id),
                          manifest, bundle)


def serve_variant(bundle: Path, variant_id: str, **admission):
    """(http server started, ModelServer) serving one variant of ``bundle``."""
    from edgeship.agent.api import InferenceHTTPServer
    from edgeship.agent.llm.http import configure
    from edgeship.agent.runtime import load_runtime
    from edgeship.agent.serving import LoadedModel, ModelServer

    inst = installed(bundle, variant_id)
    models = ModelServer()
    models.swap(LoadedModel(inst, load_runtime(inst.variant.runtime, inst.model_path,
                                               threads=1)))
    if admission:
        configure(models, **admission)
    server = InferenceHTTPServer("127.0.0.1", 0, models, 1 << 20)
    server.start()
    return server, models
