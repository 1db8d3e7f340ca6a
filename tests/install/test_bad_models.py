"""Bad models are stopped by the health check (a limited child process) or by the live
trial, each with its own reason code; the device keeps serving the version it had, and
the reverted version is remembered and never installed again."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest

from edgeship.agent.config import load_config
from edgeship.agent.daemon import Agent
from tests.support import models
from tests.support.agent_process import leftovers, predict, write_config
from tests.support import wait_until

DEVICE = "bad-models"
MODEL = "tiny"
HEALTH_CHAIN = ["downloading", "verifying", "staged", "health_check", "rolling_back",
                "failed"]
_versions = itertools.count(2)


@pytest.fixture(scope="module")
def agent(fleet):
    cfg = write_config(fleet.root / "dev", DEVICE, fleet.env.url, fleet.env.repo,
                       trial_window_s=4.0, trial_min_requests=5, health_timeout_s=10.0)
    agent = Agent(load_config(cfg))
    agent.start()
    fleet.env.agents.append(agent)
    fleet.release(MODEL, 1, models.good(1))
    fleet.env.wait_serving(DEVICE, 1)
    return agent


def _still_serving_v1(agent) -> None:
    wait_until(lambda: agent.updates.records.load(MODEL).state == "idle", 10,
               "the update record to settle")
    x = models.golden_inputs()[:2]
    status, doc = predict(agent.api.server_address[1], MODEL, x.tolist())
    assert status == 200 and doc["version"] == 1
    np.testing.assert_allclose(doc["outputs"]["y"], x @ models.weights(1), rtol=1e-5)
    assert agent.store.active_version(MODEL) == 1
    assert leftovers(agent.cfg.state_dir) == []


def _assert_blocked(fleet, agent, version: int) -> None:
    assert version in agent.updates.records.load(MODEL).blocked
    fleet.env.announce(MODEL, version)  # announced again: not retried
    ev = fleet.env.watcher.wait_for(lambda e: e.get("device") == DEVICE and
                                    e.get("event") == "rejected" and
                                    e.get("version") == version, 30)
    assert ev["reason"] == "version_blocked"
    assert fleet.chain(DEVICE, version).count("downloading") == 1


CASES = {
    # name: (model builder, reason, extra env for the health-check child)
    "nan_outputs": (models.nan_outputs, "nonfinite_output"),
    "wrong_output_shape": (models.wrong_shape, "output_shape_mismatch"),
    "wrong_outputs": (lambda k: models.good(k + 50), "golden_mismatch"),
    "10x_slower_than_budget": (lambda k: models.heavy(k, 240), "latency_budget_exceeded"),
    "hangs": (lambda k: models.heavy(k, 10 ** 12), "health_check_timeout"),
    "segfaults_on_load": (models.good, "health_check_crashed"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_model_is_reverted_with_its_reason_and_never_retried(fleet, agent, case,
                                                                 monkeypatch):
    build, reason = CASES[case]
    version = next(_versions)
    onnx_model = build(version)
    if case == "segfaults_on_load":
        # the health-check child dies of a real SIGSEGV after loading this model: a
        # sitecustomize of the tests' own, on its PYTHONPATH (see crashing_worker/)
        sha = models.sha256(onnx_model.SerializeToString())
        monkeypatch.setenv("EDGESHIP_TEST_SEGFAULT_SHA", sha[:16])
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
            [str(Path(__file__).with_name("crashing_worker"))] +
            [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    fleet.release(MODEL, version, onnx_model)
    ev = fleet.env.wait_failed(DEVICE, version, timeout_s=90)
    assert ev["reason"] == reason, ev
    assert fleet.chain(DEVICE, version) == HEALTH_CHAIN
    _still_serving_v1(agent)
    _assert_blocked(fleet, agent, version)


def test_errors_on_live_traffic_during_the_trial_revert_to_the_old_version(fleet, agent):
    version = next(_versions)
    fleet.release(MODEL, version, models.fails_on_large_inputs(version))
    fleet.env.wait_serving(DEVICE, version, timeout_s=90)
    port = agent.api.server_address[1]
    statuses = [predict(port, MODEL, [[50.0, 0, 0, 0]])[0] for _ in range(8)]
    assert 500 in statuses  # the new version fails on this input: the trial sees it
    ev = fleet.env.wait_failed(DEVICE, version, timeout_s=30)
    assert ev["reason"] == "trial_error_rate"
    assert fleet.chain(DEVICE, version) == [
        "downloading", "verifying", "staged", "health_check", "trial", "serving",
        "rolling_back", "failed"]
    reverted = fleet.env.watcher.wait_for(lambda e: e.get("device") == DEVICE and
                                          e.get("reverted_from") == version)
    assert reverted["event"] == "serving" and reverted["version"] == 1
    _still_serving_v1(agent)
    _assert_blocked(fleet, agent, version)


def test_two_models_on_one_device_each_have_their_own_lifecycle(fleet, agent):
    fleet.release("second", 1, models.good(7), k=7)
    fleet.env.watcher.wait_for(lambda e: e.get("device") == DEVICE and
                               e.get("model") == "second" and e.get("event") == "committed",
                               60)
    version = next(_versions)
    fleet.release(MODEL, version, models.nan_outputs(version))
    assert fleet.env.wait_failed(DEVICE, version)["reason"] == "nonfinite_output"
    port = agent.api.server_address[1]
    x = models.golden_inputs()[:1]
    status, doc = predict(port, "second", x.tolist())
    assert status == 200 and doc["version"] == 1
    np.testing.assert_allclose(doc["outputs"]["y"], x @ models.weights(7), rtol=1e-5)
    _still_serving_v1(agent)
    records = agent.updates.records
    assert records.load("second").history[-3:] == ("trial", "committed", "idle")
    assert records.load("second").blocked == ()
    assert version in records.load(MODEL).blocked
