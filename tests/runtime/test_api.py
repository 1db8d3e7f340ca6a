"""The local inference API over TCP and the Unix socket: listing with signatures, JSON and
.npy bodies, the Python client, and a 4xx (never a crash) for every kind of bad request."""

from __future__ import annotations

import io
import json
import socket

import numpy as np
import pytest

from edgeship.agent.api import InferenceHTTPServer, InferenceUnixServer
from edgeship.agent.client import AgentClient, ApiError
from tests.runtime.models import IN_DIM, OUT_DIM, serve, weights, write_dense_onnx

MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    pytest.importorskip("onnx")
    tmp_path = tmp_path_factory.mktemp("api")
    w, b = weights()
    models = serve(write_dense_onnx(tmp_path / "dense.onnx", w, b), "onnxruntime")
    tcp = InferenceHTTPServer("127.0.0.1", 0, models, MAX_BODY, lambda: b"# metrics\n")
    unix = InferenceUnixServer(tmp_path / "run" / "api.sock", models, MAX_BODY)
    tcp.start()
    unix.start()
    yield {"tcp": tcp, "unix": unix, "models": models, "w": w, "b": b}
    tcp.stop()
    unix.stop()


def _expected(x, w, b):
    z = x @ w.T + b
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_listing_shows_signatures_and_predictions_match_on_both_transports(servers, kind):
    x = np.random.default_rng(1).normal(size=(4, IN_DIM)).astype(np.float32)
    with AgentClient(servers[kind].url) as c:
        assert c.health()["models"] == 1
        (m,) = c.models()
        assert m["inputs"] == [{"name": "x", "dtype": "float32", "shape": [None, IN_DIM]}]
        assert m["outputs"][0]["shape"] == [None, OUT_DIM]
        y = c.predict("dense", x)  # .npy both ways
        doc = c.predict_json("dense", x)  # JSON both ways
    expected = _expected(x, servers["w"], servers["b"])
    np.testing.assert_allclose(y, expected, atol=1e-5)
    np.testing.assert_allclose(np.asarray(doc["outputs"]["probs"]), expected, atol=1e-5)
    assert doc["version"] == 1 and doc["variant"] == "onnxruntime-fp32"


def test_unix_socket_is_not_world_accessible(servers):
    mode = servers["unix"].path.stat().st_mode & 0o777
    assert mode & 0o007 == 0


def _raw(server, request: bytes) -> tuple[int, dict]:
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body) if body else {}


def _post(body: bytes, ctype: str = "application/json", path: str = "/v1/models/dense/predict",
          length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {n}\r\nConnection: close\r\n\r\n").encode() + body


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


BAD_REQUESTS = {
    "wrong_shape_json": (_post(json.dumps({"inputs": [[1.0] * (IN_DIM + 1)]}).encode()), 400),
    "wrong_rank_npy": (_post(_npy(np.ones((IN_DIM,), np.float32)), "application/x-npy"), 400),
    "wrong_dtype_npy": (_post(_npy(np.array([["a"] * IN_DIM])), "application/x-npy"), 400),
    "complex_dtype_npy": (_post(_npy(np.ones((1, IN_DIM), np.complex64)),
                                "application/x-npy"), 400),
    "strings_in_json": (_post(json.dumps({"inputs": [["x"] * IN_DIM]}).encode()), 400),
    "nan_in_json": (_post(b'{"inputs": [[NaN, 1, 1, 1, 1, 1, 1, 1]]}'), 400),
    "inf_in_npy": (_post(_npy(np.full((1, IN_DIM), np.inf, np.float32)),
                         "application/x-npy"), 400),  # the API scans values; in-process not
    "ragged_json": (_post(json.dumps({"inputs": [[1.0], [1.0, 2.0]]}).encode()), 400),
    "garbage_body": (_post(b"\x00\xff garbage {{{"), 400),
    "garbage_npy": (_post(b"\x93NUMPY garbage", "application/x-npy"), 400),
    "pickled_npy": (_post(b"\x93NUMPY\x01\x00v\x00{'descr': '|O', 'fortran_order': "
                          b"False, 'shape': (1,), }" + b" " * 60 + b"\n",
                          "application/x-npy"), 400),
    "json_without_inputs": (_post(b'{"x": 1}'), 400),
    "deeply_nested_json": (_post(b"[" * 20_000 + b"]" * 20_000), 400),
    "huge_body": (_post(b"", length=10 * MAX_BODY), 413),
    "negative_length": (_post(b"", length=-5), 400),
    "unknown_model": (_post(_npy(np.ones((1, IN_DIM), np.float32)), "application/x-npy",
                            path="/v1/models/nope/predict"), 404),
    "unknown_path": (_post(b"{}", path="/v1/nothing"), 404),
    "unknown_content_type": (_post(b"a,b,c", "text/csv"), 415),
    "no_length": (b"POST /v1/models/dense/predict HTTP/1.1\r\nHost: x\r\n"
                  b"Connection: close\r\n\r\n", 411),
    "batch_too_big": (_post(_npy(np.ones((2000, IN_DIM), np.float32)),
                            "application/x-npy"), 400),  # over the 1024-row batch cap
}


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_bad_request_gets_4xx_and_server_keeps_serving(servers, name):
    request, want = BAD_REQUESTS[name]
    status, doc = _raw(servers["tcp"], request)
    assert status == want, doc
    assert 400 <= status < 500 and doc.get("message")
    with AgentClient(servers["tcp"].url) as c:  # still serving
        assert c.predict("dense", np.ones((1, IN_DIM), np.float32)).shape == (1, OUT_DIM)


def test_truncated_body_is_a_4xx_not_a_hang(servers):
    status, doc = _raw(servers["tcp"], _post(b'{"inputs": [[1', length=100))
    assert status == 400 and "ended" in doc["message"]


def test_client_raises_api_error_with_status_and_message(servers):
    with AgentClient(servers["unix"].url) as c:
        with pytest.raises(ApiError) as err:
            c.predict("dense", np.ones((1, IN_DIM + 2), np.float32))
    assert err.value.status == 400 and "shape" in str(err.value)


def test_errors_are_counted_per_model(servers):
    before = servers["models"].stats["dense"].totals()
    with AgentClient(servers["tcp"].url) as c:
        c.predict("dense", np.ones((3, IN_DIM), np.float32))
        with pytest.raises(ApiError):
            c.predict("dense", np.ones((1, 2), np.float32))
    after = servers["models"].stats["dense"].totals()
    assert {k: after[k] - before[k] for k in after} == {"requests": 2, "errors": 1,
                                                          "samples": 4}


def test_metrics_are_served_on_the_api(servers):
    with AgentClient(servers["tcp"].url) as c:
        status, _, body = c._request("GET", "/metrics", None, {})
    assert status == 200 and body == b"# metrics\n"


def test_a_raw_route_writes_its_own_answer(tmp_path):
    """Another module (e.g. text generation with server-sent events) adds a route that
    takes the connection's handler and streams its own answer."""
    from edgeship.agent.api import Route, default_routes
    from tests.runtime.models import serve as serve_dense

    def stream(server, handler):
        body = handler._read_body(1024)
        if body is None:
            return
        handler.close_connection = True
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.end_headers()
        for word in body.split():
            handler.wfile.write(b"data: " + word + b"\n\n")

    w, b = weights()
    models = serve_dense(write_dense_onnx(tmp_path / "d.onnx", w, b), "onnxruntime")
    server = InferenceHTTPServer("127.0.0.1", 0, models,
                                 routes=default_routes() + [Route("POST", "/v1/stream", stream,
                                                                  raw=True)])
    server.start()
    try:
        status, _ = _raw(server, _post(b"", path="/v1/stream", length=5000))
        assert status == 413  # the raw route's own cap, answered in the usual form
        host, port = server.server_address[:2]
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(_post(b"a b", path="/v1/stream"))
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert data.endswith(b"data: a\n\ndata: b\n\n")
        with AgentClient(server.url) as c:  # the table's other routes still answer
            assert c.health()["models"] == 1
    finally:
        server.stop()
