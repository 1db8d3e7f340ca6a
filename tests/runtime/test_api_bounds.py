"""What a local client can spend of the device through the API is bounded: connections (a cap
per listener with a 503 the client reads, idle timeouts, the Unix socket keeps serving),
memory per JSON request (in proportion to the tensor, not the text), parse errors (a 4xx
with a reason, never a 500), and a TCP port taken by another process (one line, and the
agent keeps serving on its Unix socket)."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time
import tracemalloc

import numpy as np
import pytest

from edgeship.agent.api import InferenceHTTPServer, InferenceUnixServer
from edgeship.agent.api_limits import ApiLimits
from edgeship.agent.client import AgentClient
from tests.runtime.models import IN_DIM, serve, weights, write_dense_onnx
from tests.support import wait_until

CAP = 8


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    pytest.importorskip("onnx")
    tmp = tmp_path_factory.mktemp("bounds")
    w, b = weights()
    return serve(write_dense_onnx(tmp / "dense.onnx", w, b), "onnxruntime")


@pytest.fixture(scope="module")
def servers(models, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("bounds-sock")
    limits = ApiLimits(max_connections=CAP, idle_timeout_s=1.0, max_request_bytes=16 << 20)
    tcp = InferenceHTTPServer("127.0.0.1", 0, models, limits=limits)
    unix = InferenceUnixServer(tmp_path / "api.sock", models, limits=limits)
    tcp.start()
    unix.start()
    yield tcp, unix
    tcp.stop()
    unix.stop()


def _get(server, path: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_idle_connections_past_the_cap_get_503_while_the_unix_socket_serves(servers):
    tcp, unix = servers
    threads_before = threading.active_count()
    idle = [socket.create_connection(tcp.server_address[:2]) for _ in range(200)]
    try:
        wait_until(lambda: tcp.active_connections == CAP, 10, "the cap to fill")
        assert threading.active_count() <= threads_before + CAP + 2  # no thread per socket
        status, doc = _get(tcp, "/v1/models")
        assert status == 503 and "Unix socket" in doc["error"]
        with AgentClient(unix.url) as c:  # the other listener is untouched
            assert c.predict("dense", np.ones((1, IN_DIM), np.float32)).shape[0] == 1
        # idle connections are closed after idle_timeout_s: TCP serves again
        wait_until(lambda: _get(tcp, "/healthz")[0] == 200, 10, "idle connections closed")
    finally:
        for s in idle:
            s.close()
    assert tcp.rejected_connections >= 200 - CAP


def test_a_slow_client_is_dropped_after_the_idle_timeout(servers):
    tcp, _ = servers
    with socket.create_connection(tcp.server_address[:2]) as s:
        s.settimeout(5)
        t0 = time.monotonic()
        assert s.recv(1) == b""  # the agent closed the connection that sent nothing
        assert time.monotonic() - t0 < 4


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_memory_for_a_json_body_is_in_proportion_to_the_tensor(servers):
    """4 MiB of short floats: ~1 M Python floats and list slots with json.loads (~60 MB
    traced); parsed into the tensor's dtype it is a few times the 4 MB float32 tensor."""
    tcp, _ = servers
    row = b"[" + b",".join([b"0.5"] * IN_DIM) + b"]"
    rows = (4 << 20) // (len(row) + 1)
    body = b'{"inputs": [' + b",".join([row] * rows) + b"]}"
    tensor_bytes = rows * IN_DIM * 4

    def send():
        conn = http.client.HTTPConnection(*tcp.server_address[:2], timeout=60)
        conn.request("POST", "/v1/models/dense/predict", body=body,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 400 and b"batch of" in resp.read()  # parsed; over 1024 rows
        conn.close()

    peak = _peak_bytes(send)
    assert peak < 3 * tensor_bytes + 2 * len(body), (peak, tensor_bytes, len(body))


HUGE_INT = b"1" + b"0" * 5000
PARSE_CASES = {
    "5000-digit integer (small body)": b'{"inputs": [[' + HUGE_INT + b", 1, 1, 1, 1, 1, 1, 1]]}",
    "5000-digit integer (large array)": b'{"inputs": [' + b",".join(
        [b"[" + HUGE_INT + b"," + b",".join([b"1"] * (IN_DIM - 1)) + b"]"] * 60) + b"]}",
    "5000-digit float exponent": b'{"inputs": [[1e' + b"9" * 5000 + b", 1, 1, 1, 1, 1, 1, 1]]}",
    "30k-deep nesting": b'{"inputs": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
    "lone surrogate": b'{"inputs": "\\ud800"}',
    "invalid utf-8": b'{"inputs": "\xff\xfe"}',
    "nested object as number": b'{"inputs": [[{"a": 1}, 1, 1, 1, 1, 1, 1, 1]]}',
    "string as number": b'{"inputs": [["1", 1, 1, 1, 1, 1, 1, 1]]}',
}


@pytest.mark.parametrize("case", sorted(PARSE_CASES))
@pytest.mark.parametrize("path", ["/v1/models/dense/predict", "/v2/models/dense/infer"])
def test_every_parse_error_is_a_4xx_with_a_reason(servers, case, path):
    tcp, _ = servers
    body = PARSE_CASES[case]
    if path.startswith("/v2"):
        body = body.replace(b'{"inputs": ', b'{"inputs": [{"name": "x", "datatype": "FP32", '
                                            b'"shape": [1, 8], "data": ', 1) + b"]}"
    conn = http.client.HTTPConnection(*tcp.server_address[:2], timeout=30)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        doc = json.loads(resp.read())
    finally:
        conn.close()
    assert 400 <= resp.status < 500, doc
    assert (doc.get("message") or doc.get("error"))


def test_a_taken_api_port_is_one_line_and_the_unix_socket_keeps_serving(
        shared_broker, tmp_path, caplog, digits_onnx_for_agent):
    from edgeship.agent.config import config_from_dict
    from edgeship.agent.daemon import Agent

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    port = squatter.getsockname()[1]
    state = tmp_path / "state"
    (state / "tuf").mkdir(parents=True)
    (state / "tuf" / "root.json").write_text("{}")
    cfg = config_from_dict({"device_id": "squat", "state_dir": str(state),
                            "mqtt_url": shared_broker.url, "api_port": port})
    agent = Agent(cfg)
    try:
        with caplog.at_level(logging.ERROR, logger="edgeship.agent.local_api"):
            agent.start()  # today: OSError, the agent exits
        lines = [r.getMessage() for r in caplog.records if "taken" in r.getMessage()]
        assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0]
        assert str(cfg.api_socket_path) in lines[0] and "\n" not in lines[0]
        assert agent.api is None and agent.local_api.problems == lines
        agent.server.swap(digits_onnx_for_agent)
        with AgentClient(agent.unix_api.url) as c:
            assert c.health()["models"] == 1
    finally:
        agent.stop()
        squatter.close()


@pytest.fixture
def digits_onnx_for_agent(models):
    return models.get("dense")


def test_a_taken_grpc_port_is_one_line_and_the_grpc_socket_keeps_serving(models, tmp_path):
    pytest.importorskip("grpc")
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from edgeship.agent.config import config_from_dict
    from edgeship.agent.local_api import LocalApi

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    cfg = config_from_dict({"device_id": "g", "state_dir": str(tmp_path), "api_port": 0,
                            "grpc_enabled": True,
                            "grpc_port": squatter.getsockname()[1]})
    local = LocalApi(cfg, models, None)
    try:
        local.start()
        assert len(local.problems) == 1 and "gRPC port" in local.problems[0]
        client = grpcclient.InferenceServerClient(f"unix://{cfg.grpc_socket_path}")
        assert client.is_server_live() and client.is_model_ready("dense")
        client.close()
    finally:
        local.stop()
        squatter.close()
