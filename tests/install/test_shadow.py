"""Shadow testing per release: with a ``shadow`` policy in its manifest, a healthy candidate
first runs beside the served version on a sample of live requests; it goes on to its trial
only if the top-1 agreement meets the release's threshold, else it is reverted."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edgeship.agent.config import load_config
from edgeship.agent.daemon import Agent
from edgeship.agent.manifest import ShadowPolicy
from tests.support import models
from tests.support.agent_process import predict, write_config
from tests.support import wait_until

DEVICE = "shadow"
POLICY = ShadowPolicy(min_agreement=0.9, samples=40, timeout_s=60)


@pytest.fixture(scope="module")
def live(fleet):
    cfg = write_config(fleet.root / DEVICE, DEVICE, fleet.env.url, fleet.env.repo,
                       trial_window_s=0.5)
    agent = Agent(load_config(cfg))
    agent.start()
    fleet.env.agents.append(agent)
    fleet.release("sh", 1, models.good(1))
    fleet.env.wait_serving(DEVICE, 1)
    stop = threading.Event()
    port = agent.api.server_address[1]
    rng = np.random.default_rng(1)
    failures = []

    def traffic() -> None:  # live requests with varied inputs
        while not stop.is_set():
            status, _ = predict(port, "sh", rng.random((2, 4)).tolist())
            if status != 200:
                failures.append(status)
            stop.wait(0.01)

    t = threading.Thread(target=traffic)
    t.start()
    yield agent, failures
    stop.set()
    t.join(timeout=10)


def test_a_candidate_that_agrees_with_the_served_model_is_committed(fleet, live):
    agent, failures = live
    fleet.release("sh", 2, models.good(2), shadow=POLICY)
    wait_until(lambda: "committed" in fleet.chain(DEVICE, 2), 90, "v2 committed")
    assert fleet.chain(DEVICE, 2) == ["downloading", "verifying", "staged", "health_check",
                                      "shadow", "shadow_result", "trial", "serving",
                                      "committed"]
    trial = next(e for e in fleet.events(DEVICE, 2) if e["event"] == "trial")
    assert trial["agreement"] >= 0.9
    result = next(e for e in fleet.events(DEVICE, 2) if e["event"] == "shadow_result")
    assert result["shadow"]["agreement"] == round(trial["agreement"], 4)  # what the fleet reads
    assert result["shadow"]["compared"] >= 40 and result["shadow"]["min_agreement"] == 0.9
    assert failures == []


def test_a_candidate_that_disagrees_is_reverted_before_it_serves(fleet, live):
    agent, failures = live
    fleet.release("sh", 3, models.reversed_classes(3), shadow=POLICY,
                  golden_weights=models.weights(3)[:, ::-1])
    ev = fleet.env.wait_failed(DEVICE, 3, timeout_s=90)
    assert ev["reason"] == "shadow_disagreement"
    assert "agreement 0.000" in ev["detail"]
    assert fleet.chain(DEVICE, 3) == ["downloading", "verifying", "staged", "health_check",
                                      "shadow", "shadow_result", "rolling_back", "failed"]
    assert agent.store.active_version("sh") == 2
    assert predict(agent.api.server_address[1], "sh", [[0.1, 0.2, 0.3, 0.4]])[1]["version"] == 2
    assert 3 in agent.updates.records.load("sh").blocked
    assert failures == []
