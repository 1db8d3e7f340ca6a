from __future__ import annotations

import itertools

import pytest

from tests.install import models


class Fleet:
    """A TUF repository + fleet server (``LoopEnv``) and helpers to release test models."""

    def __init__(self, env, root) -> None:
        self.env = env
        self.root = root
        self._n = itertools.count()

    def release(self, model: str, version: int, onnx_model, k: int | None = None,
                announce: bool = True, **bundle_options):
        bundle = models.write_bundle(self.root / "bundles" / f"{model}-{version}-"
                                     f"{next(self._n)}", model, version, onnx_model, k,
                                     **bundle_options)
        self.env.release(bundle, announce=announce)
        return bundle

    def events(self, device: str, version: int | None = None, model: str | None = None,
               since: int = 0) -> list[dict]:
        """In the order the agent sent them (its timestamps): messages queued while it was
        offline may reach the broker after newer ones."""
        found = [e for e in self.env.watcher.events[since:] if e.get("device") == device and
                 (version is None or e.get("version") == version) and
                 (model is None or e.get("model") == model)]
        return sorted(found, key=lambda e: e.get("ts", 0))

    def chain(self, device: str, version: int, since: int = 0) -> list[str]:
        return [e["event"] for e in self.events(device, version, since=since)]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Its own broker per module: release announcements are retained, and an agent acts on
    every model announced on its broker."""
    from fleet.broker import Mosquitto
    from tests.loop_env import LoopEnv

    root = tmp_path_factory.mktemp("install")
    broker = Mosquitto().start()
    env = LoopEnv(broker.url, root)
    yield Fleet(env, root)
    env.close()
    broker.cleanup()
