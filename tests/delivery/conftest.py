from __future__ import annotations

import pytest

from tests.delivery.helpers import start_agent


@pytest.fixture
def serving_v1(loop_env, digits_bundles):
    """Device 'dev' serving digits v1; v2 is not released yet."""
    agent = start_agent(loop_env, "dev")
    loop_env.release(digits_bundles[1].bundle_dir)
    loop_env.wait_serving("dev", 1)
    before = agent.store.active("digits").model_path.read_bytes()
    return agent, before, digits_bundles["trained"].data.x_test[:2]


@pytest.fixture
def serving_v2(loop_env, digits_bundles, serving_v1):
    agent, _, x = serving_v1
    loop_env.release(digits_bundles[2].bundle_dir)
    loop_env.wait_serving("dev", 2)
    return agent, agent.store.active("digits").model_path.read_bytes(), x
