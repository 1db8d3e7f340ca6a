"""The fleet-side per-device byte-rate cap (issue 3): a token bucket per requesting device in
the fleet server; answers over the cap wait in a pacer thread, never in a worker."""

from __future__ import annotations

import threading
import time

import pytest

from edgeship.fleet.server import FleetServer, FleetSettings
from edgeship.fleet.transfer import DeviceRateLimits, Pacer
from tests.delivery.helpers import start_agent, variant_target, wait_event


def test_token_bucket_per_device():
    rates = DeviceRateLimits(1000, burst_bytes=1000)
    assert rates.reserve("a", 1000, now=0.0) == 0.0  # the burst
    assert rates.reserve("a", 500, now=0.0) == pytest.approx(0.5)
    assert rates.reserve("a", 500, now=0.0) == pytest.approx(1.0)  # queued behind it
    assert rates.reserve("b", 1000, now=0.0) == 0.0  # another device has its own bucket
    assert rates.reserve("a", 1000, now=3.0) == pytest.approx(0.0)  # refilled (capped)
    rates.refund("a", 1000)
    assert rates.reserve("a", 1000, now=3.0) == 0.0
    assert DeviceRateLimits(0, 1).reserve("a", 10**9, now=0.0) == 0.0  # 0 = no cap


def test_bucket_table_is_bounded():
    rates = DeviceRateLimits(1000, burst_bytes=1000, max_devices=3)
    for i in range(10):
        rates.reserve(f"d{i}", 10, now=0.0)
    assert len(rates._buckets) == 3


def test_pacer_sends_in_due_order_and_refuses_when_full():
    sent, done = [], threading.Event()

    def send(item):
        sent.append(item)
        if len(sent) == 3:
            done.set()
    pacer = Pacer(send, max_pending=3)
    pacer.start()
    try:
        now = time.monotonic()
        assert pacer.schedule(now + 0.3, "late")
        assert pacer.schedule(now + 0.1, "early")
        assert pacer.schedule(now + 0.2, "middle")
        assert not pacer.schedule(now + 0.2, "one too many")
        assert done.wait(10)
        assert sent == ["early", "middle", "late"]
        assert time.monotonic() - now >= 0.3
    finally:
        pacer.stop()


def test_fleet_caps_each_devices_byte_rate(loop_env, digits_bundles, tmp_path):
    rate = 64_000
    loop_env.fleet.stop()
    loop_env.fleet = FleetServer(FleetSettings(mqtt_url=loop_env.url, repo_dir=loop_env.repo,
                                               db_path=tmp_path / "fleet2.db",
                                               max_device_bytes_per_s=rate))
    loop_env.fleet.start()
    start_agent(loop_env, "dev", chunk_bytes=16 * 1024)  # no cap of its own
    loop_env.release(digits_bundles[1].bundle_dir)
    loop_env.wait_serving("dev", 1, timeout_s=90)
    started = wait_event(loop_env, "dev", "downloading", 1)["ts"]
    staged = wait_event(loop_env, "dev", "staged", 1)["ts"]
    size = variant_target(loop_env.repo, 1).stat().st_size
    stats = loop_env.fleet.stats.snapshot()
    assert stats["paced"] >= 1
    assert stats["bytes_sent"] >= size
    # the bucket starts with one second's worth; the rest of the model alone needs
    # (size - rate) / rate seconds at the cap (uncapped, loopback takes ~0.1 s)
    assert staged - started >= 0.8 * (size - rate) / rate
