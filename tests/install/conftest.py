from __future__ import annotations

import pytest

from tests.support.loop_env import Fleet


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Its own broker per module: release announcements are retained, and an agent acts on
    every model announced on its broker."""
    from edgeship.fleet.broker import Mosquitto
    from tests.support.loop_env import LoopEnv

    root = tmp_path_factory.mktemp("install")
    broker = Mosquitto().start()
    env = LoopEnv(broker.url, root)
    yield Fleet(env, root)
    env.close()
    broker.cleanup()
