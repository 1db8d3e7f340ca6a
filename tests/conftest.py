from __future__ import annotations

from pathlib import Path

import pytest

from edgeship.fleet.broker import Mosquitto


@pytest.fixture
def broker():
    """A fresh, real Mosquitto broker on a free loopback port for one test."""
    mosq = Mosquitto().start()
    yield mosq
    mosq.cleanup()


@pytest.fixture(scope="session")
def shared_broker():
    """One real broker for tests that only need to talk (not to restart it)."""
    mosq = Mosquitto().start()
    yield mosq
    mosq.cleanup()


@pytest.fixture(scope="session")
def digits_bundles(tmp_path_factory):
    """The demo's CNN, trained briefly, converted into bundles v1 and v2 (same weights)."""
    pytest.importorskip("torch")
    from edgeship.converter.digits import train_digits
    from edgeship.converter.pipeline import convert_digits

    root = tmp_path_factory.mktemp("bundles")
    trained = train_digits(epochs=4)
    v1 = convert_digits(root / "v1", version=1, trained=trained)
    v2 = convert_digits(root / "v2", version=2, trained=trained)
    return {"trained": trained, 1: v1, 2: v2, "root": Path(root)}


@pytest.fixture
def loop_env(broker, tmp_path):
    from tests.support.loop_env import LoopEnv

    env = LoopEnv(broker.url, tmp_path)
    yield env
    env.close()
