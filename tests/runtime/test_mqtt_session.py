"""The MQTT session against a real mosquitto: jittered capped reconnect with resubscription,
and TLS with client certificates (a CA, a server and a client cert made here)."""

from __future__ import annotations

import datetime
import ipaddress
import queue
import random
import time
from pathlib import Path

import pytest

from edgeship.agent.errors import ConfigError
from edgeship.common.mqtt import Backoff, MqttSession, SessionSettings, TlsSettings
from edgeship.fleet.broker import Mosquitto, free_port


def test_backoff_is_jittered_capped_and_resets():
    b = Backoff(0.5, 8.0, random.Random(7))
    delays = [b.next_delay_s() for _ in range(12)]
    assert all(0.25 <= d <= 8.0 for d in delays)
    assert max(delays[6:]) <= 8.0 and min(delays[6:]) >= 4.0  # capped: base stays at max
    assert len({round(d, 6) for d in delays}) == len(delays)  # jittered, not lock-step
    others = [Backoff(0.5, 8.0, random.Random(s)).next_delay_s() for s in range(20)]
    assert len({round(d, 6) for d in others}) == 20  # a fleet does not reconnect in step
    b.reset()
    assert b.next_delay_s() <= 0.5
    with pytest.raises(ConfigError):
        Backoff(2.0, 1.0)


def test_session_comes_back_and_resubscribes_after_the_broker_restarts(broker):
    got: queue.Queue = queue.Queue()
    s = MqttSession(SessionSettings(url=broker.url, client_id="t-reconnect",
                                    reconnect_min_s=0.2, reconnect_max_s=1.0),
                    on_message=got.put)
    pub = MqttSession(SessionSettings(url=broker.url, client_id="t-pub", clean_start=True,
                                      reconnect_min_s=0.2, reconnect_max_s=1.0),
                      on_message=lambda m: None)
    s.start([("t/x", 1)])
    pub.start()
    try:
        assert s.wait_subscribed(10) and pub.wait_connected(10)
        broker.stop()
        deadline = time.monotonic() + 10
        while s.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not s.connected
        time.sleep(1.5)  # several attempts against a dead broker
        broker.start()
        assert s.wait_connected(15) and s.wait_subscribed(15) and pub.wait_connected(15)
        assert s.reconnects >= 2
        assert pub.publish_acked("t/x", b"after", timeout_s=10) == 0
        assert got.get(timeout=10).payload == b"after"
    finally:
        s.stop()
        pub.stop()


# --- TLS with client certificates ----------------------------------------------------------

def _make_pki(d: Path) -> dict[str, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(subject, key, issuer, issuer_key, *, ca=False, san=None, usage=None):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        if usage:
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def write(path: Path, obj) -> Path:
        if hasattr(obj, "private_bytes"):
            data = obj.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
        else:
            data = obj.public_bytes(serialization.Encoding.PEM)
        path.write_bytes(data)
        path.chmod(0o644)
        return path

    ca_key, srv_key, cli_key, rogue_key = (ec.generate_private_key(ec.SECP256R1())
                                           for _ in range(4))
    ca = cert(name("edgeship test CA"), ca_key, name("edgeship test CA"), ca_key, ca=True)
    srv = cert(name("localhost"), srv_key, ca.subject, ca_key,
               san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(
                   "127.0.0.1"))], usage=ExtendedKeyUsageOID.SERVER_AUTH)
    cli = cert(name("device-1"), cli_key, ca.subject, ca_key,
               usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    rogue = cert(name("device-1"), rogue_key, name("rogue"), rogue_key,
                 usage=ExtendedKeyUsageOID.CLIENT_AUTH)  # self-signed, not from our CA
    return {"ca": write(d / "ca.pem", ca), "srv": write(d / "srv.pem", srv),
            "srv_key": write(d / "srv.key", srv_key), "cli": write(d / "cli.pem", cli),
            "cli_key": write(d / "cli.key", cli_key), "rogue": write(d / "rogue.pem", rogue),
            "rogue_key": write(d / "rogue.key", rogue_key)}


@pytest.fixture
def tls_broker():
    mosq = Mosquitto()
    pki = _make_pki(mosq.dir)
    mosq.dir.chmod(0o755)  # mosquitto may drop to its own user: it must read the certs
    tls_port = free_port()
    mosq.extra_conf = (f"listener {tls_port} 127.0.0.1\ncafile {pki['ca']}\n"
                       f"certfile {pki['srv']}\nkeyfile {pki['srv_key']}\n"
                       "require_certificate true\nuse_identity_as_username true\n")
    mosq.start()
    yield f"mqtts://127.0.0.1:{tls_port}", pki
    mosq.cleanup()


def _session(url: str, tls: TlsSettings, cid: str) -> MqttSession:
    return MqttSession(SessionSettings(url=url, client_id=cid, tls=tls, reconnect_min_s=0.2,
                                       reconnect_max_s=0.5), on_message=lambda m: None)


def test_tls_with_a_client_certificate_from_our_ca_connects_and_publishes(tls_broker):
    url, pki = tls_broker
    s = _session(url, TlsSettings(str(pki["ca"]), str(pki["cli"]), str(pki["cli_key"])), "c1")
    s.start()
    try:
        assert s.wait_connected(15)
        # 0x10 "no matching subscribers" is a success code too
        assert s.publish_acked("edgeship/test", b"over tls", timeout_s=10) < 0x80
    finally:
        s.stop()


@pytest.mark.parametrize("which", ["no_client_cert", "cert_from_another_ca"])
def test_tls_without_a_valid_client_certificate_is_refused(tls_broker, which):
    url, pki = tls_broker
    tls = TlsSettings(str(pki["ca"])) if which == "no_client_cert" else \
        TlsSettings(str(pki["ca"]), str(pki["rogue"]), str(pki["rogue_key"]))
    s = _session(url, tls, "c2")
    s.start()
    try:
        assert not s.wait_connected(3)
    finally:
        s.stop()


def test_mqtts_url_without_tls_settings_is_a_config_error():
    with pytest.raises(ConfigError):
        MqttSession(SessionSettings(url="mqtts://127.0.0.1:8883", client_id="x"),
                    on_message=lambda m: None)


class _Flooded:
    """paho's handle of one publish, whose wait returns only after ``count`` PUBACKs of
    other messages (fire-and-forget ones nobody collects) reached the session: the
    interleaving of paho's network thread, forced to happen every time."""

    def __init__(self, info, session: MqttSession, count: int) -> None:
        self._info, self._session, self._count = info, session, count
        self.mid, self.rc = info.mid, info.rc

    def wait_for_publish(self, timeout_s: float) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.reasoncodes import ReasonCode

        self._info.wait_for_publish(timeout_s)
        ok = ReasonCode(PacketTypes.PUBACK, identifier=0)
        for i in range(self._count):
            mid = (self.mid + 1 + i) % 65535 + 1
            if mid != self.mid:
                self._session._handle_publish(None, None, mid, ok, None)

    def is_published(self) -> bool:
        return self._info.is_published()


def test_a_publish_acked_gets_its_own_puback_code_however_many_other_acks_arrive(broker):
    """The broker answers a QoS 1 publish nobody subscribed to with reason 0x10 (no
    matching subscribers). Ten thousand PUBACKs of other messages arriving before the
    waiter reads its code must neither lose it nor turn it into 0 (success)."""
    s = MqttSession(SessionSettings(url=broker.url, client_id="t-acks", clean_start=True),
                    on_message=lambda m: None)
    s.start()
    try:
        assert s.wait_connected(10)
        assert s.publish_acked("nobody/listens", b"x", timeout_s=10) == 0x10
        publish = s._client.publish
        s._client.publish = lambda *a, **kw: _Flooded(publish(*a, **kw), s, 10_001)
        assert s.publish_acked("nobody/listens", b"x", timeout_s=10) == 0x10
        s._client.publish = publish
        assert not s._ack_waiters  # every waiter is removed, success or not
        assert len(s._early_acks) <= 1024  # acks nobody waits for stay bounded
    finally:
        s.stop()
