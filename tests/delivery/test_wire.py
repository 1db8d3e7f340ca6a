"""Transfer responses in the long and the compact form (issue 3, throughput): a device that
asks with ``"compact": true`` gets one user property instead of four; a device that does
not (an older agent) still gets the long form from a newer fleet server."""

from __future__ import annotations

import queue

import pytest

from edgeship.agent import protocol
from edgeship.agent.errors import ProtocolError, Reason, TransferError
from edgeship.common.mqtt import Message, MqttSession, SessionSettings
from edgeship.agent.protocol import Topics, TransferRequest, transfer_props
from edgeship.agent.update.transfer import parse_chunk
from edgeship.fleet.server import FleetServer, FleetSettings


def _msg(props: dict[str, str], payload: bytes = b"abc") -> Message:
    return Message("t", payload, 1, False, user_properties=props)


def test_request_compact_flag_is_optional_and_validated():
    plain = TransferRequest("targets/m/1/f", 0, 10)
    assert "compact" not in protocol.decode(plain.to_bytes())  # what older devices send
    assert TransferRequest.from_bytes(plain.to_bytes()).compact is False
    asked = TransferRequest("targets/m/1/f", 0, 10, compact=True)
    assert TransferRequest.from_bytes(asked.to_bytes()) == asked
    bad = asked.to_bytes().replace(b'"compact":true', b'"compact":"yes"')
    with pytest.raises(ProtocolError, match="compact"):
        TransferRequest.from_bytes(bad)


@pytest.mark.parametrize("compact", [False, True])
def test_both_forms_parse_to_the_same_chunk(compact):
    props = transfer_props(200, 4096, 9000, compact=compact)
    assert len(props) == (1 if compact else 4)
    chunk = parse_chunk(_msg(props))
    assert (chunk.status, chunk.offset, chunk.total, chunk.data) == (200, 4096, 9000, b"abc")
    err = parse_chunk(_msg(transfer_props(503, 0, 0, "busy", compact=compact), b""))
    assert (err.status, err.error) == (503, "busy")


@pytest.mark.parametrize("value, reason", [
    ("2 200 0 10", Reason.UNSUPPORTED_SCHEMA),
    ("1 200 0", Reason.MALFORMED_MESSAGE),
    ("1 ok 0 10", Reason.MALFORMED_MESSAGE),
    ("", Reason.MALFORMED_MESSAGE),
])
def test_bad_compact_responses_are_rejected_with_a_reason(value, reason):
    with pytest.raises(TransferError) as err:
        parse_chunk(_msg({protocol.TRANSFER_COMPACT: value}))
    assert err.value.reason_code == reason


def test_fleet_answers_in_the_form_the_device_asked_for(broker, tmp_path):
    repo = tmp_path / "repo"
    (repo / "targets" / "m" / "1").mkdir(parents=True)
    (repo / "metadata").mkdir()
    (repo / "targets" / "m" / "1" / "f").write_bytes(b"x" * 5000)
    fleet = FleetServer(FleetSettings(mqtt_url=broker.url, repo_dir=repo,
                                      db_path=tmp_path / "fleet.db"))
    fleet.start()
    answers: "queue.Queue[Message]" = queue.Queue()
    dev = MqttSession(SessionSettings(url=broker.url, client_id="wire-dev", clean_start=True,
                                      session_expiry_s=0), answers.put)
    dev.start([(Topics.transfer_response("wire-dev"), 1)])
    try:
        assert dev.wait_subscribed(10)
        for compact in (False, True):
            dev.publish(Topics.transfer_request("wire-dev"),
                        TransferRequest("targets/m/1/f", 1000, 2000, compact).to_bytes(),
                        response_topic=Topics.transfer_response("wire-dev"),
                        correlation_data=b"c%d" % compact)
            msg = answers.get(timeout=10)
            assert msg.user_properties == transfer_props(200, 1000, 5000, compact=compact)
            assert msg.payload == b"x" * 2000
    finally:
        dev.stop()
        fleet.stop()
