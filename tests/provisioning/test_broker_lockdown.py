"""The generated broker configuration against a real Mosquitto with real certificates."""

from __future__ import annotations

import queue
import time

import pytest

from edgeship.agent.protocol import Topics
from edgeship.fleet.broker_config import refresh_acl_and_crl

NOT_AUTHORIZED = 0x87


def ok(rc: int) -> bool:
    """MQTT 5: < 0x80 is success (0x10 = accepted, no matching subscribers)."""
    return rc < 0x80


def drain(inbox, wait_s: float = 0.5) -> list:
    out, deadline = [], time.monotonic() + wait_s
    while True:
        try:
            out.append(inbox.get(timeout=max(0.0, deadline - time.monotonic())))
        except queue.Empty:
            return out


def test_device_may_publish_its_own_topics_but_not_another_devices(locked_broker):
    a = locked_broker.identity("device", "dev-a")
    locked_broker.identity("device", "dev-b")
    sa, _ = locked_broker.session(a)
    assert sa.wait_connected(10)
    try:
        assert ok(sa.publish_acked(Topics.status("dev-a"), b"{}", timeout_s=10))
        assert ok(sa.publish_acked(Topics.transfer_request("dev-a"), b"{}", timeout_s=10))
        for topic in (Topics.status("dev-b"), Topics.telemetry("dev-b"),
                      Topics.presence("dev-b"), Topics.desired("dev-a"),
                      Topics.desired("dev-b"), Topics.transfer_response("dev-b"),
                      Topics.transfer_request("dev-b"), Topics.release("digits")):
            assert sa.publish_acked(topic, b"{}", timeout_s=10) == NOT_AUTHORIZED, topic
    finally:
        sa.stop()


def test_device_subscribed_to_everything_sees_nothing_of_another_device(locked_broker):
    a, b = locked_broker.identity("device", "dev-a"), locked_broker.identity("device", "dev-b")
    fleet = locked_broker.identity("fleet", "server-1")
    sa, inbox_a = locked_broker.session(a, subscriptions=[("#", 1), ("edgeship/v1/dev/+/#", 1),
                                                          (Topics.RELEASES_FILTER, 1)])
    sb, inbox_b = locked_broker.session(b, subscriptions=[(Topics.desired("dev-b"), 1)])
    sf, _ = locked_broker.session(fleet)
    try:
        for s in (sa, sb, sf):
            assert s.wait_subscribed(10)
        assert ok(sb.publish_acked(Topics.status("dev-b"), b"b-status", timeout_s=10))
        assert ok(sb.publish_acked(Topics.telemetry("dev-b"), b"b-tele", timeout_s=10))
        assert ok(sf.publish_acked(Topics.desired("dev-b"), b"b-desired", timeout_s=10))
        assert ok(sf.publish_acked(Topics.transfer_response("dev-b"), b"b-chunk",
                                   timeout_s=10))
        assert ok(sf.publish_acked(Topics.release("digits"), b"release", timeout_s=10))
        # B got its desired state from the fleet: delivery works, so A's silence means ACL
        assert [m.payload for m in drain(inbox_b, 2.0)] == [b"b-desired"]
        seen = drain(inbox_a, 1.0)
        # the subscriptions overlap, so the release may come more than once; B's never
        assert seen and {m.topic for m in seen} == {Topics.release("digits")}
    finally:
        for s in (sa, sb, sf):
            s.stop()


def test_only_fleet_identity_writes_desired_and_serves_transfers(locked_broker):
    fleet = locked_broker.identity("fleet", "server-1")
    b = locked_broker.identity("device", "dev-b")
    sf, inbox_f = locked_broker.session(fleet, subscriptions=[
        (Topics.TRANSFER_REQUESTS_SHARED, 1), (Topics.DEVICE_STATUS_FILTER, 1)])
    sb, inbox_b = locked_broker.session(b, subscriptions=[
        (Topics.transfer_response("dev-b"), 1)])
    try:
        assert sf.wait_subscribed(10) and sb.wait_subscribed(10)
        assert ok(sb.publish_acked(Topics.transfer_request("dev-b"), b"req", timeout_s=10))
        assert ok(sb.publish_acked(Topics.status("dev-b"), b"st", timeout_s=10))
        got = {m.topic: m.payload for m in drain(inbox_f, 2.0)}
        assert got == {Topics.transfer_request("dev-b"): b"req", Topics.status("dev-b"): b"st"}
        assert ok(sf.publish_acked(Topics.transfer_response("dev-b"), b"chunk", timeout_s=10))
        assert [m.payload for m in drain(inbox_b, 2.0)] == [b"chunk"]
    finally:
        sf.stop()
        sb.stop()


def test_connecting_with_another_devices_client_id_does_not_disconnect_it(locked_broker):
    a, b = locked_broker.identity("device", "dev-a"), locked_broker.identity("device", "dev-b")
    sb, inbox_b = locked_broker.session(b, client_id="dev-b",
                                        subscriptions=[(Topics.desired("dev-b"), 1)])
    assert sb.wait_subscribed(10)
    sa, _ = locked_broker.session(a, client_id="dev-b")  # A pretends to be B
    try:
        assert sa.wait_connected(10)
        time.sleep(1.0)  # a takeover would have dropped B by now
        assert sb.connected
        # the broker renamed A's session to its CN: A still cannot act as B ...
        assert sa.publish_acked(Topics.status("dev-b"), b"x", timeout_s=10) == NOT_AUTHORIZED
        assert ok(sa.publish_acked(Topics.status("dev-a"), b"x", timeout_s=10))
        # ... and B's session still works end to end
        fleet = locked_broker.identity("fleet", "server-1")
        sf, _ = locked_broker.session(fleet)
        assert sf.wait_connected(10)
        assert ok(sf.publish_acked(Topics.desired("dev-b"), b"still-b", timeout_s=10))
        assert [m.payload for m in drain(inbox_b, 2.0)] == [b"still-b"]
        assert sb.connected
        sf.stop()
    finally:
        sa.stop()
        sb.stop()


def test_revoked_certificate_is_refused(locked_broker):
    a = locked_broker.identity("device", "dev-a")
    sa, _ = locked_broker.session(a)
    assert sa.wait_connected(10)
    sa.stop()
    assert locked_broker.ca.revoke("dev-a")
    refresh_acl_and_crl(locked_broker.conf_dir, locked_broker.ca)
    locked_broker.mosq.restart()  # Mosquitto reads the CRL when it starts
    sa, _ = locked_broker.session(a)
    c = locked_broker.identity("device", "dev-c")  # a live certificate still works
    sc, _ = locked_broker.session(c)
    try:
        assert sc.wait_connected(10)
        assert not sa.wait_connected(3)
    finally:
        sa.stop()
        sc.stop()


def test_client_without_certificate_is_refused(locked_broker):
    import ssl
    import socket

    ctx = ssl.create_default_context(cafile=str(locked_broker.ca.cert_path))
    with socket.create_connection(("127.0.0.1", locked_broker.mosq.port), timeout=5) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"\x10\x00")  # handshake completes lazily in TLS 1.3
                assert tls.recv(1) == b""  # the broker closes: no certificate
                raise ConnectionError("closed")
