"""The digits model served the way the agent serves a bundle, importing only agent modules
(the idle-RSS child of ``bench/agent.py`` imports this and the agent, nothing else)."""

from __future__ import annotations

from pathlib import Path


def loaded(path: Path, runtime: str, threads: int, input_name: str = "x"):
    """A ModelServer serving ``path`` as model "digits" the way the agent serves a bundle
    (manifest signature, variant, runtime). Imports only agent modules."""
    from edgeship.agent.manifest import Manifest, TensorSpec, Variant
    from edgeship.agent.runtime import load_runtime
    from edgeship.agent.serving import LoadedModel, ModelServer
    from edgeship.agent.store import InstalledModel

    variant = Variant(id=f"{runtime}-fp32", runtime=runtime, precision="fp32",
                      file=path.name, sha256="0" * 64, size=path.stat().st_size)
    manifest = Manifest(model="digits", version=1, task="classification",
                        inputs=(TensorSpec(input_name, "float32", (None, 1, 8, 8)),),
                        outputs=(TensorSpec("logits", "float32", (None, 10)),),
                        variants=(variant,), golden_file="golden.npz",
                        golden_sha256="0" * 64, golden_size=1)
    server = ModelServer()
    inst = InstalledModel("digits", 1, variant, manifest, path.parent)
    server.swap(LoadedModel(inst, load_runtime(runtime, path, threads=threads)))
    return server
