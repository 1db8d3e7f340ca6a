import json

import pytest
from hypothesis import given, strategies as st

from edgeship.agent import protocol
from edgeship.agent.errors import ProtocolError, Reason
from edgeship.agent.protocol import ReleaseAnnouncement, Topics, TransferRequest, parse_topic


def test_topics_round_trip_through_the_parser():
    assert parse_topic(Topics.status("pi-1")).kind == "status"
    assert parse_topic(Topics.status("pi-1")).device == "pi-1"
    assert parse_topic(Topics.release("digits")).model == "digits"
    assert parse_topic(Topics.transfer_request("pi-1")).kind == "transfer_req"
    assert parse_topic(Topics.transfer_response("pi-1")).kind == "transfer_resp"


@pytest.mark.parametrize("topic", ["edgeship/v2/dev/a/status", "other/v1/x",
                                   "edgeship/v1/dev/../status", "edgeship/v1/dev/a/b/c",
                                   "edgeship/v1/fleet/releases/a b"])
def test_unknown_or_hostile_topics_are_rejected(topic):
    with pytest.raises(ProtocolError):
        parse_topic(topic)


def test_announcement_round_trips_and_carries_schema_version():
    ann = ReleaseAnnouncement("digits", 3, 1700000000.0)
    raw = json.loads(ann.to_bytes())
    assert raw["schema"] == protocol.SCHEMA_VERSION
    assert ReleaseAnnouncement.from_bytes(ann.to_bytes()) == ann


@pytest.mark.parametrize("payload,reason", [
    (b"\xff\xfe not json", Reason.MALFORMED_MESSAGE),
    (b"[1,2]", Reason.MALFORMED_MESSAGE),
    (b'{"schema": 99, "kind": "release", "model": "m", "version": 1, "released_at": 0}',
     Reason.UNSUPPORTED_SCHEMA),
    (b'{"schema": 1, "kind": "release", "model": "m", "version": "1", "released_at": 0}',
     Reason.MALFORMED_MESSAGE),
    (b'{"schema": 1, "kind": "release", "model": "m", "version": 0, "released_at": 0}',
     Reason.MALFORMED_MESSAGE),
    (b'{"schema": 1, "kind": "release", "model": "../x", "version": 1, "released_at": 0}',
     Reason.MALFORMED_MESSAGE),
    (b" " * (protocol.MAX_CONTROL_BYTES + 1), Reason.PAYLOAD_TOO_LARGE),
])
def test_bad_announcements_get_a_reason_code(payload, reason):
    with pytest.raises(ProtocolError) as err:
        ReleaseAnnouncement.from_bytes(payload)
    assert err.value.reason_code == reason


@pytest.mark.parametrize("path", ["/etc/passwd", "targets/../x", "metadata//a", "other/x",
                                  "targets/a\\b", "", "targets/./a"])
def test_transfer_requests_for_paths_outside_the_repository_are_rejected(path):
    payload = protocol.encode("transfer_request", {"path": path, "offset": 0, "length": 10})
    with pytest.raises(ProtocolError):
        TransferRequest.from_bytes(payload)


@given(st.binary(max_size=2048))
def test_decoder_never_raises_anything_but_protocol_error(data):
    try:
        ReleaseAnnouncement.from_bytes(data)
    except ProtocolError:
        pass


@given(st.text(max_size=200))
def test_topic_parser_never_raises_anything_but_protocol_error(topic):
    try:
        parse_topic(topic)
    except ProtocolError:
        pass
