"""The telemetry forwarder against a real mosquitto: accepted records leave the spool, a
publish the broker refuses (ACL, PUBACK reason 0x87) lands in the dead-letter table."""

from __future__ import annotations

import json
import queue

import pytest

from edgeship.common.mqtt import MqttSession, SessionSettings
from edgeship.agent.protocol import Topics
from edgeship.agent.spool import SpoolSettings, TelemetrySpool
from edgeship.agent.telemetry import TelemetryForwarder
from edgeship.fleet.broker import Mosquitto


@pytest.fixture
def acl_broker():
    mosq = Mosquitto()
    acl = mosq.dir / "acl"
    acl.write_text(f"topic deny {Topics.telemetry('dev-denied')}\ntopic readwrite #\n")
    acl.chmod(0o644)
    mosq.dir.chmod(0o755)
    mosq.extra_conf = f"acl_file {acl}\n"
    mosq.start()
    yield mosq
    mosq.cleanup()


def _session(url: str, cid: str, got: queue.Queue | None = None) -> MqttSession:
    s = MqttSession(SessionSettings(url=url, client_id=cid, clean_start=True),
                    on_message=(got.put if got is not None else lambda m: None))
    return s


@pytest.mark.parametrize("device,accepted", [("dev-ok", True), ("dev-denied", False)])
def test_records_leave_the_spool_only_on_success_and_refusals_are_dead_lettered(
        acl_broker, tmp_path, device, accepted):
    got: queue.Queue = queue.Queue()
    consumer = _session(acl_broker.url, "consumer", got)
    consumer.start([(Topics.DEVICE_TELEMETRY_FILTER, 1)])
    agent = _session(acl_broker.url, f"agent-{device}")
    agent.start()
    spool = TelemetrySpool(SpoolSettings(tmp_path / "t.db"))
    try:
        assert consumer.wait_subscribed(10) and agent.wait_connected(10)
        for _ in range(3):
            spool.push(lambda seq: json.dumps({"seq": seq}).encode())
        fwd = TelemetryForwarder(spool, agent, Topics.telemetry(device), ack_timeout_s=10)
        assert fwd.drain() == 3
        st = spool.stats()
        assert st.queued == 0
        if accepted:
            assert (st.acked, st.dead_lettered) == (3, 0)
            assert sorted(json.loads(got.get(timeout=10).payload)["seq"]
                          for _ in range(3)) == [1, 2, 3]
        else:
            assert (st.acked, st.dead_lettered) == (0, 3)
            assert [(s, rc) for s, rc, _ in spool.dead_letters()] == \
                [(1, 0x87), (2, 0x87), (3, 0x87)]
            assert got.empty()
    finally:
        agent.stop()
        consumer.stop()
        spool.close()


def test_nothing_is_sent_or_lost_while_disconnected(tmp_path, broker):
    agent = _session(broker.url, "agent-off")  # never started: not connected
    spool = TelemetrySpool(SpoolSettings(tmp_path / "t.db"))
    spool.push(lambda seq: b"{}")
    assert TelemetryForwarder(spool, agent, Topics.telemetry("d")).drain() == 0
    assert spool.stats().queued == 1
    spool.close()
