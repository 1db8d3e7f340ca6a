"""The fleet's REST server under bad input and idle clients: Content-Type is enforced,
NaN never enters a rollout policy nor leaves the API, a non-numeric Content-Length is a
400 without internals, and idle connections are capped and closed."""

from __future__ import annotations

import json
import socket
import time

import pytest

from edgeship.fleet.web.server import WebSettings
from tests.fleet_control.web import start_web, stop_web
from tests.support import wait_until


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    fleet = start_web(tmp_path_factory.mktemp("web") / "fleet.db",
                      WebSettings(max_connections=16, idle_timeout_s=1.0))
    fleet.registry.upsert_presence("pi-1", {"online": True, "models": {"m": {"version": 1}}})
    fleet.registry.add_release("m", 2, 1.0, "test")
    yield fleet
    stop_web(fleet)


def _raw(web, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", web.port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


def test_content_type_other_than_json_is_refused(web):
    reply = web.call("POST", "/api/v1/rollouts", token=web.tokens["operate"],
                     body=b'{"model": "m", "version": 2}',
                     headers={"Content-Type": "text/plain"})
    assert reply.status == 415 and web.registry.rollouts() == []


@pytest.mark.parametrize("policy", ['{"soak_s": NaN}', '{"gates": {"max_error_rate": NaN}}',
                                    '{"wave_timeout_s": Infinity}', '{"jitter_s": "10"}',
                                    '{"max_concurrent": 1.5}', '{"waves": [0.5, "1"]}',
                                    '{"gates": {"min_install_success": 7}}', '[1]'])
def test_a_rollout_policy_with_nan_or_wrong_types_is_refused(web, policy):
    body = f'{{"model": "m", "version": 2, "policy": {policy}}}'.encode()
    reply = web.call("POST", "/api/v1/rollouts", token=web.tokens["operate"], body=body)
    assert reply.status == 400, reply.body
    assert web.registry.rollouts() == []


def test_the_api_never_answers_nan_even_for_a_record_that_holds_it(web):
    # a rollout written by an older release with NaN in its policy
    web.registry.save_rollout("r-old", "m", "aborted", {
        "id": "r-old", "model": "m", "from_version": 1, "to_version": 2,
        "target": {"group": None, "tag": None}, "policy": {"soak_s": float("nan")},
        "waves": [["pi-1"]], "created_by": "old", "created_at": 1.0, "state": "aborted",
        "verdicts": [{"wave": 0, "decision": "fail", "measured": {"ratio": float("nan")}}]})
    try:
        reply = web.call("GET", "/api/v1/rollouts", token=web.tokens["read"])
        assert reply.status == 200
        text = reply.body.decode()
        assert "NaN" not in text and "Infinity" not in text
        [old] = reply.json()  # strict: a browser's JSON.parse accepts it
        assert old["id"] == "r-old" and "soak_s" in old["reason"]
        one = web.call("GET", "/api/v1/rollouts/r-old", token=web.tokens["read"])
        assert one.status == 400 and "soak_s" in one.json()["error"]
    finally:
        from edgeship.fleet import schema
        with web.registry.db.write() as conn:
            conn.execute(schema.rollouts.delete())


@pytest.mark.parametrize("length", ["abc", "-5", "1e3", " "])
def test_a_bad_content_length_is_a_400_without_internals(web, length):
    head = (f"POST /api/v1/devices/pi-1/tags HTTP/1.1\r\nHost: 127.0.0.1:{web.port}\r\n"
            f"Authorization: Bearer {web.tokens['operate']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n{{}}")
    data = _raw(web, head.encode())
    status = int(data.split(b" ", 2)[1])
    body = data.split(b"\r\n\r\n", 1)[1]
    if length == " ":  # empty: no body, the command runs with {}
        assert status == 200
        return
    assert status == 400, data
    error = json.loads(body)["error"]
    assert "Content-Length" in error and "ValueError" not in error and "invalid" not in error


def test_idle_connections_are_closed_and_capped(web):
    held = [socket.create_connection(("127.0.0.1", web.port), timeout=10) for _ in range(40)]
    try:
        # past the cap: answered 503 at once, not queued behind idle clients
        busy = [s.recv(200) for s in held[16:20]]
        assert all(b" 503 " in b for b in busy), busy

        def all_closed():
            for s in held[:16]:
                s.settimeout(0.05)
                try:
                    if s.recv(1) != b"":
                        return False
                except TimeoutError:
                    return False
                except OSError:
                    pass
            return True
        wait_until(all_closed, timeout_s=30, what="the server to close idle connections")
        reply = web.call("GET", "/api/v1/whoami", token=web.tokens["read"])
        assert reply.status == 200
    finally:
        for s in held:
            s.close()


def test_a_slow_request_is_cut_off_but_the_server_keeps_answering(web):
    with socket.create_connection(("127.0.0.1", web.port), timeout=10) as s:
        s.sendall(b"GET /api/v1/whoami HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
        time.sleep(1.5)
        assert web.call("GET", "/api/v1/whoami", token=web.tokens["read"]).status == 200
        s.settimeout(5)
        left = s.recv(100)  # the server hung up on it (or said 408)
        assert left == b"" or b" 408 " in left
