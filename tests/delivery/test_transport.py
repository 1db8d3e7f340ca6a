"""Transport over a real Mosquitto: resume after an agent restart and after a broker
outage, the per-device byte-rate cap, the fleet's concurrent-transfer cap and kill switch."""

from __future__ import annotations

import pytest

from edgeship.agent.update.transfer import RateLimiter
from edgeship.fleet.server import FleetServer, FleetSettings
from tests.delivery.helpers import (assert_untouched, release_full, resume_files,
                                    start_agent, variant_target, wait_event)
from tests.support import wait_until

CHUNK = 16 * 1024


@pytest.fixture
def slow_v1(loop_env, digits_bundles):
    """A device with small chunks and a byte-rate cap, serving v1."""
    agent = start_agent(loop_env, "dev", chunk_bytes=CHUNK, transfer_max_bytes_per_s=48_000,
                        transfer_timeout_s=2.0)
    loop_env.release(digits_bundles[1].bundle_dir)
    loop_env.wait_serving("dev", 1)
    before = agent.store.active("digits").model_path.read_bytes()
    return agent, before, digits_bundles["trained"].data.x_test[:2]


def test_download_resumes_after_an_agent_restart(loop_env, digits_bundles, slow_v1):
    agent, _, x = slow_v1
    release_full(loop_env, digits_bundles[2].bundle_dir, announce=True)
    size = variant_target(loop_env.repo, 2).stat().st_size
    wait_until(lambda: any(p.stat().st_size >= size // 3 for p in resume_files(agent)),
          what="a third of the model downloaded")
    agent.stop()  # mid-transfer
    loop_env.agents.remove(agent)
    (part,) = resume_files(agent)
    kept = part.stat().st_size
    assert 0 < kept < size
    from edgeship.agent.daemon import Agent
    again = Agent(agent.cfg)
    again.start()
    loop_env.agents.append(again)
    loop_env.wait_serving("dev", 2)
    assert again.updates.fetcher.bytes_resumed == kept  # replayed from disk, not re-sent
    assert again.store.active("digits").model_path.read_bytes() == \
        (digits_bundles[2].bundle_dir / "model.fp32.onnx").read_bytes()
    assert resume_files(again) == []


def test_download_resumes_after_a_broker_outage_resending_at_most_one_chunk(
        loop_env, digits_bundles, slow_v1, broker):
    agent, _, x = slow_v1
    release_full(loop_env, digits_bundles[2].bundle_dir, announce=True)
    size = variant_target(loop_env.repo, 2).stat().st_size
    wait_until(lambda: any(p.stat().st_size >= size // 2 for p in resume_files(agent)),
          what="half of the model downloaded")
    broker.restart()  # every connection drops; sessions and queued messages persist
    loop_env.wait_serving("dev", 2, timeout_s=90)
    target = variant_target(loop_env.repo, 2)
    path = "targets/" + str(target.relative_to(loop_env.repo / "targets"))
    received = agent.transfers.received_by_path[path]
    assert size <= received <= size + CHUNK  # at most one chunk sent twice
    assert agent.store.active("digits").model_path.read_bytes() == target.read_bytes()


def test_rate_cap_paces_requests():
    now = [0.0]
    slept = []
    limiter = RateLimiter(1000, clock=lambda: now[0],
                          sleep=lambda s: (slept.append(s), now.__setitem__(0, now[0] + s)))
    for _ in range(5):
        limiter.acquire(1000)
    assert sum(slept) == pytest.approx(4.0)  # the first second is the bucket
    assert RateLimiter(0).acquire(10**9) is None  # 0 = unlimited


def test_kill_switch_stops_a_release_mid_transfer(loop_env, digits_bundles, slow_v1):
    agent, before, x = slow_v1
    release_full(loop_env, digits_bundles[2].bundle_dir, announce=True)
    wait_until(lambda: resume_files(agent), what="the transfer to start")
    loop_env.fleet.stop_release("digits", 2)
    assert wait_event(loop_env, "dev", "failed", 2)["reason"] == "release_stopped"
    assert loop_env.fleet.stats.snapshot()["stopped"] >= 1
    assert_untouched(agent, 1, before, x)


def test_fleet_caps_concurrent_transfers_and_devices_retry(loop_env, digits_bundles, tmp_path):
    loop_env.fleet.stop()
    loop_env.fleet = FleetServer(FleetSettings(mqtt_url=loop_env.url, repo_dir=loop_env.repo,
                                               db_path=tmp_path / "fleet2.db",
                                               max_transfers=1))
    loop_env.fleet.start()
    for name in ("dev-a", "dev-b"):
        start_agent(loop_env, name, chunk_bytes=CHUNK, transfer_max_bytes_per_s=200_000,
                    transfer_timeout_s=2.0)
    loop_env.release(digits_bundles[1].bundle_dir)
    loop_env.wait_serving("dev-a", 1, timeout_s=90)
    loop_env.wait_serving("dev-b", 1, timeout_s=90)
    assert loop_env.fleet.stats.snapshot()["busy"] >= 1  # one had to wait its turn
    assert loop_env.fleet.gate.active() <= 1
