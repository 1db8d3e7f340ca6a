"""FleetServer against a real Mosquitto: transfers over MQTT 5 request/response, device
reports into the registry, retained release announcements."""

from __future__ import annotations

import hashlib
import queue

import pytest

from edgeship.common.mqtt import MqttSession, SessionSettings
from edgeship.agent.protocol import (TRANSFER_ERROR, TRANSFER_OFFSET, TRANSFER_SCHEMA, TRANSFER_STATUS,
                            TRANSFER_TOTAL, ReleaseAnnouncement, Topics, TransferRequest,
                            encode, status_event)
from edgeship.fleet.server import FleetServer, FleetSettings
from edgeship.fleet.tuf_repo import release_bundle
from tests.fleet.helpers import make_bundle
from tests.support import wait_until

DEVICE = "pi-1"


@pytest.fixture
def released(repo, tmp_path):
    keys, repo_dir = repo
    bundle = make_bundle(tmp_path / "bundles")
    info = release_bundle(bundle, repo_dir, keys)
    return repo_dir, bundle, info


@pytest.fixture
def server(broker, released, tmp_path):
    repo_dir, _, _ = released
    srv = FleetServer(FleetSettings(mqtt_url=broker.url, repo_dir=repo_dir,
                                    db_path=tmp_path / "fleet.db", workers=2))
    srv.start()
    yield srv
    srv.stop()


class Device:
    """A plain MqttSession client playing a device."""

    def __init__(self, url: str, device: str = DEVICE, extra_subs=()) -> None:
        self.device = device
        self.inbox: queue.Queue = queue.Queue()
        self.session = MqttSession(SessionSettings(url=url, client_id=f"test-{device}",
                                                   clean_start=True),
                                   on_message=self.inbox.put)
        self.session.start([(Topics.transfer_response(device), 1), *extra_subs])
        assert self.session.wait_connected(10)
        self._corr = 0

    def report(self, kind: str, payload: bytes) -> None:
        topic = getattr(Topics, kind)(self.device)
        self.session.publish_acked(topic, payload, timeout_s=5)

    def request(self, payload: bytes, response_topic: str | None = None):
        self._corr += 1
        corr = f"c{self._corr}".encode()
        self.session.publish(Topics.transfer_request(self.device), payload,
                             response_topic=response_topic or
                             Topics.transfer_response(self.device), correlation_data=corr)
        msg = self.inbox.get(timeout=10)
        assert msg.correlation_data == corr
        return msg

    def close(self) -> None:
        self.session.stop()


@pytest.fixture
def device(broker, server):
    dev = Device(broker.url)
    presence = encode("presence", {"device": DEVICE, "online": True, "profile": "rpi4",
                                   "agent_version": "0.1", "models": {"digits": {"version": 1}}})

    def landed():  # the server's subscriptions are live once a presence report is stored;
        dev.report("presence", presence)  # re-sent: one sent under load may go unseen
        try:
            return wait_until(lambda: server.registry.devices(), timeout_s=5.0)
        except AssertionError:
            return None

    wait_until(landed, what="the device's presence in the registry")
    yield dev
    dev.close()


def _target(info, name):
    return next(p for p in info.targets if p.endswith("/" + name))


def test_transfer_request_is_answered_with_bytes_and_properties(device, server, released):
    _, bundle, _ = released
    data = (bundle / "onnx-fp32.onnx").read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    path = f"targets/digits/1/{sha}.onnx-fp32.onnx"
    first = device.request(TransferRequest(path, 0, 5).to_bytes())
    rest = device.request(TransferRequest(path, 5, 4096).to_bytes())
    assert first.payload + rest.payload == data
    assert first.user_properties == {TRANSFER_SCHEMA: "1", TRANSFER_STATUS: "200",
                                     TRANSFER_OFFSET: "0", TRANSFER_TOTAL: str(len(data))}
    assert rest.user_properties[TRANSFER_OFFSET] == "5"
    assert not first.retain
    meta = device.request(TransferRequest("metadata/timestamp.json", 0, 65536).to_bytes())
    assert meta.user_properties[TRANSFER_STATUS] == "200" and b'"timestamp"' in meta.payload
    stats = server.stats.snapshot()
    assert stats["requests_served"] == 3
    assert stats["bytes_sent"] == len(data) + len(meta.payload)


def test_missing_file_is_404_and_malformed_request_is_400(device, server):
    missing = device.request(TransferRequest("targets/digits/9/x.onnx", 0, 10).to_bytes())
    assert missing.user_properties[TRANSFER_STATUS] == "404" and missing.payload == b""
    for payload in (b"{not json", encode("transfer_request", {"path": "targets/../../etc",
                                                              "offset": 0, "length": 10})):
        bad = device.request(payload)
        assert bad.user_properties[TRANSFER_STATUS] == "400"
        assert bad.user_properties[TRANSFER_ERROR]
    assert server.stats.snapshot()["transfer_errors"] == 3


def test_garbage_on_the_status_topic_does_not_stop_the_server(device, server):
    for garbage in (b"\xff\xfe garbage", b"[1, 2]", encode("status", {})[:-1], b"x" * 70000,
                    b'{"schema": 99, "kind": "status"}'):
        device.report("status", garbage)
    wait_until(lambda: server.stats.snapshot()["malformed"] >= 5)
    ok = device.request(TransferRequest("metadata/1.root.json", 0, 100).to_bytes())
    assert ok.user_properties[TRANSFER_STATUS] == "200"


def test_presence_status_and_telemetry_land_in_the_registry(device, server):
    device.report("status", status_event(DEVICE, "installed", model="digits", version=1))
    device.report("telemetry", encode("telemetry", {"device": DEVICE, "latency_ms": 2.5}))
    wait_until(lambda: server.registry.latest_telemetry(DEVICE))
    events = wait_until(lambda: server.registry.events(DEVICE))
    assert [(e.event, e.model, e.version) for e in events] == [("installed", "digits", 1)]
    [dev] = server.registry.devices()
    assert (dev.online, dev.profile, dev.models) == (True, "rpi4", {"digits": {"version": 1}})
    assert dev.last_event == "installed"
    assert server.registry.latest_telemetry(DEVICE)["latency_ms"] == 2.5


def test_requests_without_an_allowed_response_topic_are_dropped(device, server):
    device.session.publish(Topics.transfer_request(DEVICE),
                           TransferRequest("metadata/root.json", 0, 10).to_bytes())
    device.session.publish(Topics.transfer_request(DEVICE),
                           TransferRequest("metadata/root.json", 0, 10).to_bytes(),
                           response_topic=Topics.release("digits"), correlation_data=b"x")
    wait_until(lambda: server.stats.snapshot()["no_response_topic"] == 2)
    ok = device.request(TransferRequest("metadata/root.json", 0, 10).to_bytes())
    assert ok.user_properties[TRANSFER_STATUS] == "200"


def test_announce_publishes_a_retained_release_and_records_it(broker, server, released):
    _, _, info = released
    server.announce(info, by="test")
    late = Device(broker.url, "late-joiner", extra_subs=[(Topics.RELEASES_FILTER, 1)])
    msg = late.inbox.get(timeout=10)
    late.close()
    assert msg.retain and msg.topic == Topics.release("digits")
    ann = ReleaseAnnouncement.from_bytes(msg.payload)
    assert (ann.model, ann.version) == ("digits", 1)
    assert server.registry.releases() == [("digits", 1, info.released_at, "test")]
