"""The fleet on a broker without shared subscriptions (aedes 2, with a login): two fleet
servers split the devices, nothing is answered twice, a device started after the release
installs it, telemetry lands in the registry, a bad release halts its rollout. And on any
broker, a device that was offline at release time installs it even with no retained
announcement left on the broker."""

from __future__ import annotations

import socket

from edgeship.common.mqtt import BrokerFeatures
from edgeship.agent.protocol import Topics
from edgeship.fleet.server import FleetServer, FleetSettings
from tests.brokers.conftest import PASSWORD, USER
from tests.support import wait_until
from tests.support.broker_loop import BrokerLoop, run_loop


def test_two_fleet_servers_split_the_loop_on_aedes_with_a_login(aedes_login, tmp_path):
    loop = BrokerLoop(tmp_path, aedes_login.url, aedes_login.url, fleets=2, username=USER,
                      password=PASSWORD, tag="split").start()
    try:
        result = run_loop(loop, timeout_s=60)
    finally:
        loop.close()
    assert result.ok, result.problems
    assert result.transfer_modes == ["split", "split"]
    assert all(n > 0 for n in result.served_per_fleet)  # both answered their devices ...
    assert result.duplicate_answers == 0  # ... and no request was answered twice
    assert result.telemetry_devices == 3 and result.late_agent_serving_s is not None
    assert result.rollout.startswith("halted") and "nonfinite_output" in result.rollout


def test_device_offline_at_release_installs_it_without_a_retained_announcement(
        shared_broker, tmp_path):
    loop = BrokerLoop(tmp_path, shared_broker.url, shared_broker.url, tag="noretain").start()
    try:
        fleet = loop.fleets[0]
        assert fleet.transfer_mode == "share"  # Mosquitto has shared subscriptions
        loop.release(1)
        # what ejabberd does across nodes (and any broker after a wipe): no retained copy
        assert fleet._session.publish_acked(Topics.release(loop.model), b"", retain=True,
                                            timeout_s=10) < 0x80
        late = loop.start_agent("noretain-late")
        loop.wait_serving([late.device], 1, timeout_s=60)
        assert fleet.stats.snapshot()["catch_ups"] >= 1
        # the device's connection drops and comes back: it is caught up again, and since
        # it already serves v1 nothing is re-sent
        before = fleet.stats.snapshot()
        reconnects = late.session.reconnects
        late.session._client.socket().shutdown(socket.SHUT_RDWR)  # a cut cable
        wait_until(lambda: late.session.reconnects > reconnects and
                   late.session.wait_subscribed(0), 30, what="the reconnect")
        wait_until(lambda: fleet.stats.snapshot()["connections"] > before["connections"], 10,
                   what="the fleet saw the new connection")  # counted after its catch-up
        assert fleet.stats.snapshot()["catch_ups"] == before["catch_ups"]  # nothing re-sent
        wait_until(lambda: loop.registry.devices()[0].online, 10, what="online again")
    finally:
        loop.close()


def test_fleet_falls_back_to_splitting_when_share_is_refused(shared_broker, tmp_path):
    """A broker that offers shared subscriptions in its CONNACK but answers 0x9E: the
    fleet server subscribes to the plain filter instead, and every later connect too."""
    fleet = FleetServer(FleetSettings(mqtt_url=shared_broker.url, repo_dir=tmp_path,
                                      db_path=tmp_path / "fleet.db"))
    offered = BrokerFeatures(shared_subscriptions=True)
    assert (Topics.TRANSFER_REQUESTS_SHARED, 1) in fleet._subscriptions(offered)
    fleet._on_subscribe_result(Topics.TRANSFER_REQUESTS_SHARED, 0x9E)
    assert fleet.transfer_mode == "split"
    again = fleet._subscriptions(offered)
    assert (Topics.TRANSFER_REQUESTS, 1) in again
    assert all(f != Topics.TRANSFER_REQUESTS_SHARED for f, _ in again)
    fleet.registry.close()
