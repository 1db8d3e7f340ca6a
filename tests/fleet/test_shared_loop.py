"""Many real agents in one process on one shared MQTT network thread (the fleet bench's
mode, issue 6 "Scale"), against a real Mosquitto and an in-process fleet server."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edgeship.common.mqtt import MqttSession, SessionSettings
from edgeship.common.mqtt_loop import SharedLoop
from bench.fleet_agents import gate_installs, make_agent
from tests.support.synthetic import sample_inputs, write_synthetic_bundle

WIDTH = 64  # a small synthetic model: the test is about the agents, not the bytes


@pytest.fixture
def shared_loop():
    loop = SharedLoop()
    yield loop
    loop.stop()


def paho_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("paho-mqtt-client")]


def test_twenty_agents_on_one_loop_all_serve_a_release(loop_env, shared_loop, tmp_path):
    bundle = write_synthetic_bundle(tmp_path / "bundle", version=1, width=WIDTH)
    slots = threading.BoundedSemaphore(4)
    devices = [f"shared-{i:02d}" for i in range(20)]
    before = paho_threads()
    agents = []
    try:
        for device in devices:
            agent = make_agent(tmp_path / "devices", device, loop_env.url, loop_env.repo,
                               telemetry_s=60.0, mqtt_loop=shared_loop)
            gate_installs(agent, slots)
            agent.start()
            agents.append(agent)
        assert paho_threads() == before  # no network thread per agent
        assert all(a.session.wait_subscribed(10) for a in agents)
        loop_env.release(bundle)
        for device in devices:
            loop_env.wait_serving(device, 1, timeout_s=60)
        x = sample_inputs(WIDTH)
        reference = agents[0].server.predict("synth", x)[0][0]
        for agent, device in zip(agents, devices):
            # each agent verified the signed metadata into its own state directory and
            # serves from its own session
            assert (tmp_path / "devices" / device / "tuf" / "timestamp.json").exists()
            assert agent.store.active("synth").version == 1
            outputs, loaded = agent.server.predict("synth", x)
            assert loaded.installed.version == 1
            np.testing.assert_allclose(outputs[0], reference, rtol=1e-5)
        ids = {a.session.settings.client_id for a in agents}
        assert len(ids) == len(agents)
    finally:
        for agent in agents:
            agent.stop()


def test_shared_loop_session_reconnects_and_keeps_its_session(broker, shared_loop):
    got: list[bytes] = []
    arrived = threading.Event()

    def on_message(msg):
        got.append(msg.payload)
        arrived.set()

    sub = MqttSession(SessionSettings(url=broker.url, client_id="shared-sub",
                                      reconnect_min_s=0.1, reconnect_max_s=0.5),
                      on_message, loop=shared_loop)
    pub = MqttSession(SessionSettings(url=broker.url, client_id="shared-pub",
                                      reconnect_min_s=0.1, reconnect_max_s=0.5),
                      lambda m: None, loop=shared_loop)
    sub.start([("t/shared", 1)])
    pub.start()
    try:
        assert sub.wait_subscribed(10) and pub.wait_connected(10)
        broker.restart()  # both sockets drop; the loop must bring both back
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (sub.connected and pub.connected):
            time.sleep(0.05)
        assert sub.connected and pub.connected
        assert sub.reconnects >= 1
        assert sub.wait_subscribed(10)
        assert pub.publish_acked("t/shared", b"after-restart", timeout_s=10) == 0
        assert arrived.wait(10)
        assert got == [b"after-restart"]
    finally:
        pub.stop()
        sub.stop()
    assert sub._client.socket() is None  # noqa: SLF001 - the DISCONNECT went out


def test_shared_loop_moves_large_payloads_both_ways(broker, shared_loop):
    """Payloads larger than a socket buffer: partial writes must resume on writability."""
    received: dict[str, bytes] = {}
    done = threading.Event()
    sessions = []

    def make(i):
        def on_message(msg):
            received[f"s{i}"] = msg.payload
            if len(received) == 5:
                done.set()
        s = MqttSession(SessionSettings(url=broker.url, client_id=f"big-{i}",
                                        clean_start=True, session_expiry_s=0),
                        on_message, loop=shared_loop)
        s.start([(f"big/{i}", 1)])
        return s

    sessions = [make(i) for i in range(5)]
    try:
        assert all(s.wait_subscribed(10) for s in sessions)
        payloads = {i: bytes([i]) * (3 * 2**20) for i in range(5)}
        for i, s in enumerate(sessions):
            assert s.publish_acked(f"big/{(i + 1) % 5}", payloads[i], timeout_s=20) == 0
        assert done.wait(20)
        for i in range(5):
            assert received[f"s{(i + 1) % 5}"] == payloads[i]
    finally:
        for s in sessions:
            s.stop()
