"""The Open Inference Protocol (KServe v2) on the local API, driven by the real Triton client
(``tritonclient[http,grpc]``) over HTTP (TCP) and gRPC (TCP and the Unix socket), JSON and
binary: metadata, readiness, versions, inference on models with several inputs of different
datatypes (outputs identical to a bare onnxruntime session) and errors."""

from __future__ import annotations

import http.client
import json
import subprocess

import numpy as np
import pytest

from edgeship.agent.api import InferenceHTTPServer, InferenceUnixServer
from edgeship.agent.api_limits import ApiLimits
from edgeship.fleet.broker import free_port
from tests.support import models as zoo

httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
pytest.importorskip("grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from edgeship.agent.grpc_api import GrpcInferenceServer  # noqa: E402

LIMITS = ApiLimits(max_connections=16, idle_timeout_s=5.0)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("oip")
    models = zoo.serve_onnx(tmp / "multi" / "m.onnx", "multi", zoo.multi_input(),
                            zoo.MULTI_INPUTS, zoo.MULTI_OUTPUTS)
    ins, outs = zoo.every_dtype_specs()
    zoo.serve_onnx(tmp / "every" / "m.onnx", "every", zoo.every_dtype(), ins, outs, models)
    zoo.serve_onnx(tmp / "image" / "m.onnx", "image", zoo.image_doubler(), zoo.IMAGE_INPUTS,
                   zoo.IMAGE_OUTPUTS, models)
    tcp = InferenceHTTPServer("127.0.0.1", 0, models, limits=LIMITS)
    unix = InferenceUnixServer(tmp / "api.sock", models, limits=LIMITS)
    grpc_server = GrpcInferenceServer(models, LIMITS, socket_path=tmp / "grpc.sock",
                                      port=free_port())
    for s in (tcp, unix, grpc_server):
        s.start()
    import onnxruntime as ort
    bare = ort.InferenceSession(zoo.multi_input().SerializeToString(),
                                providers=["CPUExecutionProvider"])
    clients = {"http": httpclient.InferenceServerClient(tcp.url.removeprefix("http://")),
               "grpc-tcp": grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_server.port}"),
               "grpc-unix": grpcclient.InferenceServerClient(f"unix://{tmp / 'grpc.sock'}")}
    yield {"models": models, "tcp": tcp, "unix": unix, "grpc": grpc_server, "bare": bare,
           "clients": clients}
    for c in clients.values():
        c.close()
    for s in (tcp, unix, grpc_server):
        s.stop()


def _module(kind: str):
    return httpclient if kind == "http" else grpcclient


def _inputs(kind: str, feed: dict[str, np.ndarray], binary: bool = True) -> list:
    mod, out = _module(kind), []
    for name, arr in feed.items():
        t = mod.InferInput(name, list(arr.shape), _datatype(arr.dtype))
        if kind == "http":
            t.set_data_from_numpy(arr, binary_data=binary)
        else:
            t.set_data_from_numpy(arr)
        out.append(t)
    return out


def _datatype(dtype: np.dtype) -> str:
    from tritonclient.utils import np_to_triton_dtype
    return np_to_triton_dtype(dtype)


CLIENTS = ["http", "grpc-tcp", "grpc-unix"]


@pytest.mark.parametrize("kind", CLIENTS)
def test_server_and_model_metadata_and_readiness(env, kind):
    c = env["clients"][kind]
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("multi") and c.is_model_ready("multi", "1")
    assert not c.is_model_ready("multi", "7") and not c.is_model_ready("nope")
    meta = c.get_model_metadata("multi")
    if kind != "http":
        from google.protobuf.json_format import MessageToDict
        meta = MessageToDict(meta, preserving_proto_field_name=True)
        for t in meta["inputs"] + meta["outputs"]:
            t["shape"] = [int(d) for d in t["shape"]]
    assert meta["name"] == "multi" and meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]},
                              {"name": "k", "datatype": "INT64", "shape": [-1, 1]},
                              {"name": "m", "datatype": "BOOL", "shape": [-1, 4]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 4]},
                               {"name": "count", "datatype": "INT64", "shape": [-1]}]
    server = c.get_server_metadata()
    name = server["name"] if kind == "http" else server.name
    assert name == "edgeship-agent"


@pytest.mark.parametrize("kind,binary", [("http", True), ("http", False),
                                         ("grpc-tcp", True), ("grpc-unix", True)])
def test_several_inputs_of_different_datatypes_match_a_bare_session(env, kind, binary):
    feed = zoo.multi_input_feed(5, seed=3)
    c, mod = env["clients"][kind], _module(kind)
    outputs = None
    if kind == "http":
        outputs = [mod.InferRequestedOutput("y", binary_data=binary),
                   mod.InferRequestedOutput("count", binary_data=binary)]
    result = c.infer("multi", _inputs(kind, feed, binary), outputs=outputs, request_id="r1")
    y, count = env["bare"].run(None, feed)
    assert result.as_numpy("y").dtype == np.float32 and result.as_numpy("count").dtype == np.int64
    np.testing.assert_array_equal(result.as_numpy("y"), y)
    np.testing.assert_array_equal(result.as_numpy("count"), count)
    response = result.get_response()
    assert (response["id"] if kind == "http" else response.id) == "r1"


@pytest.mark.parametrize("kind,binary", [("http", True), ("http", False), ("grpc-tcp", True)])
def test_every_datatype_round_trips(env, kind, binary):
    rng = np.random.default_rng(0)
    feed = {}
    for key, (_, dtype) in zoo.EVERY_DTYPE.items():
        values = rng.integers(-100, 100, size=(3, 2)) if dtype != "bool" else \
            rng.random((3, 2)) < 0.5
        feed[f"in_{key}"] = np.asarray(values * (1.37 if dtype.startswith("float") else 1),
                                       dtype=dtype)
    outs = [_module(kind).InferRequestedOutput(f"out_{k[3:]}", **(
        {"binary_data": binary} if kind == "http" else {})) for k in feed]
    result = env["clients"][kind].infer("every", _inputs(kind, feed, binary), outputs=outs)
    for name, arr in feed.items():
        got = result.as_numpy("out_" + name[3:])
        assert got.dtype == arr.dtype and np.array_equal(got, arr), name


@pytest.mark.parametrize("kind", ["grpc-tcp", "grpc-unix"])
def test_grpc_raw_contents_cut_from_the_wire_match_a_bare_session(env, kind, monkeypatch):
    """Large requests take the zero-copy path (raw contents as views of the received
    bytes, some of them misaligned for their dtype); outputs identical, NaN refused."""
    from edgeship.agent import grpc_wire
    monkeypatch.setattr(grpc_wire, "SPLIT_MIN_BYTES", 0)
    feed = zoo.multi_input_feed(257, seed=5)
    c = env["clients"][kind]
    result = c.infer("multi", _inputs(kind, feed), request_id="big")
    y, count = env["bare"].run(None, feed)
    np.testing.assert_array_equal(result.as_numpy("y"), y)
    np.testing.assert_array_equal(result.as_numpy("count"), count)
    assert result.get_response().id == "big"
    feed["x"][3, 1] = np.nan
    with pytest.raises(InferenceServerException) as err:
        c.infer("multi", _inputs(kind, feed))
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "NaN" in err.value.message() or "finite" in err.value.message()


@pytest.mark.parametrize("kind", CLIENTS)
def test_image_sized_tensors_both_ways(env, kind):
    """Bulk paths: the binary body read into an aligned buffer and viewed in place, the
    binary answer gathered in one write from the output's memory; gRPC raw contents cut
    from the wire; the NaN scan of a large tensor."""
    img = np.random.default_rng(2).random(zoo.IMAGE_SHAPE, dtype=np.float32)
    mod, c = _module(kind), env["clients"][kind]
    outputs = [mod.InferRequestedOutput("twice", **({"binary_data": True}
                                                    if kind == "http" else {}))]
    result = c.infer("image", _inputs(kind, {"img": img}), outputs=outputs)
    np.testing.assert_array_equal(result.as_numpy("twice"), img + img)
    img[0, 2, 127, 127] = np.inf
    with pytest.raises(InferenceServerException) as err:
        c.infer("image", _inputs(kind, {"img": img}), outputs=outputs)
    assert err.value.status() in ("400", "StatusCode.INVALID_ARGUMENT")


@pytest.mark.parametrize("pad", [0, 1, 2, 3])
def test_binary_input_at_any_offset_of_the_body(env, pad):
    """The binary data starts wherever the JSON header ends (any length); each offset is
    read into place, the answer identical."""
    img = np.random.default_rng(pad).random(zoo.IMAGE_SHAPE, dtype=np.float32)
    head = json.dumps({"inputs": [{"name": "img", "shape": list(img.shape),
                                   "datatype": "FP32",
                                   "parameters": {"binary_data_size": img.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode() + b" " * pad
    conn = http.client.HTTPConnection(*env["tcp"].server_address[:2])
    conn.request("POST", "/v2/models/image/infer", body=head + img.tobytes(),
                 headers={"Inference-Header-Content-Length": str(len(head))})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    assert resp.status == 200
    n = int(resp.getheader("Inference-Header-Content-Length"))
    assert json.loads(body[:n])["outputs"][0]["parameters"] == {"binary_data_size": img.nbytes}
    np.testing.assert_array_equal(
        np.frombuffer(body[n:], np.float32).reshape(img.shape), img + img)


def test_requested_outputs_and_binary_body_layout(env):
    feed = zoo.multi_input_feed(2)
    header = {"inputs": [{"name": n, "shape": list(a.shape),
                          "datatype": _datatype(a.dtype), "data": a.tolist()}
                         for n, a in feed.items()],
              "outputs": [{"name": "count", "parameters": {"binary_data": True}}]}
    status, headers, body = _post(env["tcp"], "/v2/models/multi/infer",
                                  json.dumps(header).encode())
    assert status == 200
    n = int(headers["inference-header-content-length"])
    doc = json.loads(body[:n])
    assert [o["name"] for o in doc["outputs"]] == ["count"]  # only what was asked for
    (out,) = doc["outputs"]
    assert out["parameters"]["binary_data_size"] == len(body) - n == 16
    np.testing.assert_array_equal(np.frombuffer(body[n:], "<i8"),
                                  env["bare"].run(["count"], feed)[0])


def _post(server, path: str, body: bytes, headers: dict | None = None,
          method: str = "POST") -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _v2_body(feed: dict, **overrides) -> bytes:
    doc = {"inputs": [{"name": n, "shape": list(a.shape), "datatype": _datatype(a.dtype),
                       "data": a.tolist()} for n, a in feed.items()]}
    doc.update(overrides)
    return json.dumps(doc).encode()


def _bad_dtype():
    feed = zoo.multi_input_feed(1)
    feed["x"] = feed["x"].astype(np.float64)
    return feed


def _with_nan():
    feed = zoo.multi_input_feed(1)
    feed["x"][0, 0] = np.nan
    return feed


V2_ERRORS = {
    "unknown model": ("/v2/models/nope/infer", _v2_body(zoo.multi_input_feed(1)), 404),
    "unknown version": ("/v2/models/multi/versions/9/infer", _v2_body(zoo.multi_input_feed(1)),
                        404),
    "version not a number": ("/v2/models/multi/versions/abc/infer", b"{}", 404),
    "wrong datatype": ("/v2/models/multi/infer", _v2_body(_bad_dtype()), 400),
    "wrong shape": ("/v2/models/multi/infer", json.dumps({"inputs": [
        {"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}).encode(), 400),
    "values for another shape": ("/v2/models/multi/infer", json.dumps({"inputs": [
        {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3]}]}).encode(), 400),
    "missing input": ("/v2/models/multi/infer", json.dumps({"inputs": [
        {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}).encode(),
                      400),
    "nan": ("/v2/models/multi/infer", _v2_body(_with_nan()), 400),
    "unknown output": ("/v2/models/multi/infer", _v2_body(zoo.multi_input_feed(1), outputs=[
        {"name": "nope"}]), 400),
    "sequence": ("/v2/models/multi/infer", _v2_body(zoo.multi_input_feed(1), parameters={
        "sequence_id": 3}), 400),
    "garbage": ("/v2/models/multi/infer", b"\x00{{{", 400),
    "unknown endpoint": ("/v2/models/multi/explain", b"{}", 404),
}


@pytest.mark.parametrize("case", sorted(V2_ERRORS))
def test_errors_have_the_protocol_status_and_body(env, case):
    path, body, want = V2_ERRORS[case]
    status, _, data = _post(env["tcp"], path, body)
    assert status == want, data
    assert set(json.loads(data)) == {"error"} and json.loads(data)["error"]


def test_binary_sizes_that_do_not_add_up_are_400(env):
    feed = zoo.multi_input_feed(1)
    head = json.dumps({"inputs": [
        {"name": n, "shape": list(a.shape), "datatype": _datatype(a.dtype),
         "parameters": {"binary_data_size": a.nbytes}} for n, a in feed.items()]}).encode()
    data = b"".join(a.tobytes() for a in feed.values())
    for tail in (data[:-1], data + b"extra"):
        status, _, body = _post(env["tcp"], "/v2/models/multi/infer", head + tail,
                                {"Inference-Header-Content-Length": str(len(head))})
        assert status == 400 and "error" in json.loads(body)
    status, _, body = _post(env["tcp"], "/v2/models/multi/infer", head + data,
                            {"Inference-Header-Content-Length": str(len(head))})
    assert status == 200, body


@pytest.mark.parametrize("kind", ["grpc-tcp", "grpc-unix"])
def test_grpc_errors_carry_the_protocol_codes(env, kind):
    c, feed = env["clients"][kind], zoo.multi_input_feed(1)
    cases = [(lambda: c.infer("nope", _inputs(kind, feed)), "StatusCode.NOT_FOUND"),
             (lambda: c.infer("multi", _inputs(kind, feed), model_version="5"),
              "StatusCode.NOT_FOUND"),
             (lambda: c.infer("multi", _inputs(kind, _bad_dtype())),
              "StatusCode.INVALID_ARGUMENT"),
             (lambda: c.get_model_metadata("nope"), "StatusCode.NOT_FOUND")]
    for call, code in cases:
        with pytest.raises(InferenceServerException) as err:
            call()
        assert err.value.status() == code


def test_kept_version_is_served_by_number_during_a_trial_and_gone_after(env, tmp_path):
    models = env["models"]
    before = models.get("multi")
    v2 = zoo.serve_onnx(tmp_path / "v2" / "m.onnx", "multi", _doubled(), zoo.MULTI_INPUTS,
                        zoo.MULTI_OUTPUTS, version=2).get("multi")
    try:
        models.swap(v2, keep_previous=True)  # what a trial does
        c, feed = env["clients"]["http"], zoo.multi_input_feed(2)
        assert c.get_model_metadata("multi")["versions"] == ["1", "2"]
        y1 = c.infer("multi", _inputs("http", feed), model_version="1").as_numpy("y")
        y2 = c.infer("multi", _inputs("http", feed)).as_numpy("y")
        np.testing.assert_array_equal(y1, env["bare"].run(["y"], feed)[0])
        np.testing.assert_array_equal(y2, 2 * y1)
        models.drop_kept("multi")  # committed
        assert not c.is_model_ready("multi", "1")
        status, _, body = _post(env["tcp"], "/v2/models/multi/versions/1/infer",
                                _v2_body(feed))
        assert status == 404 and "has no version 1" in json.loads(body)["error"]
    finally:
        models.swap(before)


def _doubled():
    model = zoo.multi_input()
    from onnx import helper
    graph = model.graph
    graph.node[2].output[0] = "y1"
    graph.node.append(helper.make_node("Add", ["y1", "y1"], ["y"]))
    return model


def test_not_ready_while_the_agent_starts(env):
    models = env["models"]
    models.ready = False
    try:
        assert not env["clients"]["http"].is_server_ready()
        assert not env["clients"]["grpc-tcp"].is_server_ready()
        assert env["clients"]["http"].is_server_live()
    finally:
        models.ready = True


def test_oversized_request_is_refused_before_it_is_read(env):
    limits = ApiLimits(max_request_bytes=4096)
    small = InferenceHTTPServer("127.0.0.1", 0, env["models"], limits=limits)
    small.start()
    try:
        feed = zoo.multi_input_feed(400)
        c = httpclient.InferenceServerClient(small.url.removeprefix("http://"))
        with pytest.raises(InferenceServerException) as err:
            c.infer("multi", _inputs("http", feed))
        assert err.value.status() == "413" and "cap" in err.value.message()
        c.close()
    finally:
        small.stop()


def test_generated_grpc_code_is_current(tmp_path):
    pytest.importorskip("grpc_tools")
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    subprocess.run([str(root / "scripts" / "gen-grpc"), str(tmp_path)], check=True,
                   capture_output=True, env={"PYTHON": __import__("sys").executable,
                                             "PATH": "/usr/bin:/bin"})
    assert (tmp_path / "oip_pb2.py").read_text() == \
        (root / "agent" / "oip_pb2.py").read_text()
