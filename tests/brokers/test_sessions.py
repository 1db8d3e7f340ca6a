"""The MQTT session on brokers that are not Mosquitto, and when things go wrong: one
SUBSCRIBE per filter, a refused filter and a missing SUBACK cost only their filter (and are
logged), a login, disconnect reason codes, and a connection that is dropped right after its
CONNACK does not reset the reconnect backoff."""

from __future__ import annotations

import logging
import queue
import time

import pytest

from edgeship.agent.config import config_from_dict
from edgeship.agent.errors import ConfigError
from edgeship.common.mqtt import SUBACK_TIMEOUT, MqttSession, SessionSettings
from tests.brokers.conftest import HANG, PASSWORD, USER
from tests.support import wait_until


def _session(url: str, cid: str, inbox: queue.Queue | None = None, **kw) -> MqttSession:
    return MqttSession(SessionSettings(url=url, client_id=cid, clean_start=True,
                                       session_expiry_s=0, **kw),
                       on_message=(inbox.put if inbox is not None else lambda m: None))


def test_refused_and_unanswered_filters_cost_only_themselves(aedes, caplog):
    inbox: queue.Queue = queue.Queue()
    results: list[tuple[str, int]] = []
    ready = []
    s = MqttSession(SessionSettings(url=aedes.url, client_id="t-filters", clean_start=True,
                                    session_expiry_s=0, subscribe_timeout_s=1.5),
                    on_message=inbox.put, on_connect=lambda: ready.append(1),
                    on_subscribe_result=lambda f, c: results.append((f, c)))
    with caplog.at_level(logging.WARNING, logger="edgeship.common.mqtt"):
        s.start([("ok/+", 1), ("$share/g/shared/+", 1), (f"{HANG}x", 1)])
        try:
            assert s.wait_subscribed(10)
            assert s.granted == {"ok/+": 1, "$share/g/shared/+": 0x9E,
                                 f"{HANG}x": SUBACK_TIMEOUT}
            assert sorted(results) == sorted(s.granted.items())
            assert ready == [1]  # on_connect once the subscriptions settled
            assert s.features is not None and not s.features.shared_subscriptions
            assert s.publish_acked("ok/1", b"still works", timeout_s=10) == 0
            assert inbox.get(timeout=10).payload == b"still works"
        finally:
            s.stop()
    text = caplog.text
    assert "refused the subscription $share/g/shared/+" in text and "0x9e" in text
    assert f"no SUBACK from {aedes.url} for {HANG}x" in text


def test_login_with_a_password_and_a_clear_refusal_without_one(aedes_login, tmp_path, caplog):
    good = _session(aedes_login.url, "t-login", username=USER, password=PASSWORD)
    bad = _session(aedes_login.url, "t-nologin", reconnect_min_s=5, reconnect_max_s=5)
    with caplog.at_level(logging.WARNING, logger="edgeship.common.mqtt"):
        good.start()
        bad.start()
        try:
            assert good.wait_connected(10)
            wait_until(lambda: bad.refused_code is not None, 10, what="the refusal")
            assert not bad.connected and bad.refused_code in (0x86, 0x87)
        finally:
            good.stop()
            bad.stop()
    assert "check the MQTT user name and password" in caplog.text
    assert PASSWORD not in repr(good.settings)  # never in logs or tracebacks


def test_agent_config_reads_the_password_from_a_file(tmp_path):
    secret = tmp_path / "mqtt-password"
    secret.write_text(PASSWORD + "\n")
    cfg = config_from_dict({"device_id": "d", "state_dir": str(tmp_path), "mqtt_username": USER,
                            "mqtt_password_file": str(secret), "mqtt_client_id": "thing-d"})
    assert cfg.mqtt_password() == PASSWORD and cfg.mqtt_client_id == "thing-d"
    with pytest.raises(ConfigError, match="mqtt_username"):
        config_from_dict({"device_id": "d", "state_dir": str(tmp_path),
                          "mqtt_password_file": str(secret)})
    missing = config_from_dict({"device_id": "d", "state_dir": str(tmp_path),
                                "mqtt_username": USER,
                                "mqtt_password_file": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="mqtt_password_file"):
        missing.mqtt_password()


def test_a_connection_dropped_right_after_connack_backs_off(shared_broker, caplog):
    """Two sessions with one client id take the connection from each other: every CONNACK
    is followed by the broker closing the older connection. The old session reset its backoff on each CONNACK
    and reconnected twice a second forever; now the wait grows to the cap."""
    pair = [_session(shared_broker.url, "t-same-id", reconnect_min_s=0.05,
                     reconnect_max_s=0.4) for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="edgeship.common.mqtt"):
        for s in pair:
            s.start()
        try:
            time.sleep(4.0)
        finally:
            for s in pair:
                s.stop()
    assert max(s.backoff.attempt for s in pair) >= 4  # grown, never reset to 0
    # at the min delay they would have reconnected ~80 times each in 4 s; capped at 0.4 s
    # (jittered 0.2-0.4 s) about 10-20
    assert sum(s.reconnects for s in pair) < 60
    lost = [r.getMessage() for r in caplog.records if "lost after" in r.getMessage()]
    assert lost and all("(reason code 0x" in m for m in lost)  # each drop logged, with code
