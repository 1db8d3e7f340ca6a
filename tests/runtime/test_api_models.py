"""The local /v1 API serves the models users bring: named inputs of any dtype (JSON by name,
.npz for several inputs, .npy for one), every output back by name, a body cap derived from
the model's input size that a client actually receives as a 413, and a stateful model run
step by step by a client that passes the state back in."""

from __future__ import annotations

import http.client
import json

import numpy as np
import pytest

from edgeship.agent.api import InferenceHTTPServer, InferenceUnixServer
from edgeship.agent.api_limits import ApiLimits, body_caps
from edgeship.agent.client import AgentClient, ApiError
from tests.support import models as zoo

pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api-models")
    models = zoo.serve_onnx(tmp / "multi" / "m.onnx", "multi", zoo.multi_input(),
                            zoo.MULTI_INPUTS, zoo.MULTI_OUTPUTS)
    zoo.serve_onnx(tmp / "rnn" / "m.onnx", "rnn", zoo.stateful(), zoo.STATEFUL_INPUTS,
                   zoo.STATEFUL_OUTPUTS, models)
    tcp = InferenceHTTPServer("127.0.0.1", 0, models)  # caps derived per model
    unix = InferenceUnixServer(tmp / "api.sock", models)
    tcp.start()
    unix.start()
    import onnxruntime as ort
    bare = {name: ort.InferenceSession(f().SerializeToString(),
                                       providers=["CPUExecutionProvider"])
            for name, f in (("multi", zoo.multi_input), ("rnn", zoo.stateful))}
    yield {"tcp": tcp, "unix": unix, "models": models, "bare": bare}
    tcp.stop()
    unix.stop()


def test_json_by_name_takes_every_dtype_and_returns_every_output(api):
    feed = zoo.multi_input_feed(3)
    with AgentClient(api["tcp"].url) as c:
        doc = c.predict_json("multi", {k: v.tolist() for k, v in feed.items()})
    y, count = api["bare"]["multi"].run(None, feed)
    assert set(doc["outputs"]) == {"y", "count"}
    np.testing.assert_array_equal(np.asarray(doc["outputs"]["y"], np.float32), y)
    assert doc["outputs"]["count"] == count.tolist()


def test_npz_carries_several_inputs_and_every_output_by_name(api):
    feed = zoo.multi_input_feed(4, seed=1)
    with AgentClient(api["unix"].url) as c:
        out = c.predict_all("multi", feed)
    y, count = api["bare"]["multi"].run(None, feed)
    assert out["y"].dtype == np.float32 and out["count"].dtype == np.int64
    np.testing.assert_array_equal(out["y"], y)
    np.testing.assert_array_equal(out["count"], count)


def test_json_integers_for_an_int64_input_are_exact_and_floats_are_refused(api):
    feed = zoo.multi_input_feed(1)
    doc = {k: v.tolist() for k, v in feed.items()}
    doc["k"] = [[2**53 + 1]]  # not representable as a float64: parsed as an integer
    with AgentClient(api["tcp"].url) as c:
        c.predict_json("multi", doc)
        doc["k"] = [[1.5]]
        with pytest.raises(ApiError) as err:
            c.predict_json("multi", doc)
    assert err.value.status == 400 and "floats" in str(err.value)


def test_a_stateful_model_runs_step_by_step_with_the_state_passed_back(api):
    rng = np.random.default_rng(5)
    steps = rng.normal(size=(6, 2, 3)).astype(np.float32)
    sr = np.array(16000, np.int64)  # a scalar input
    h_api = h_bare = np.zeros((1, 2, 5), np.float32)  # batch on axis 1
    with AgentClient(api["unix"].url) as c:
        for x in steps:
            out = c.predict_all("rnn", {"x": x, "h": h_api, "sr": sr})
            y_bare, h_bare = api["bare"]["rnn"].run(None, {"x": x, "h": h_bare, "sr": sr})
            np.testing.assert_array_equal(out["y"], y_bare)
            h_api = out["h_out"]
        doc = c.predict_json("rnn", {"x": steps[0].tolist(), "h": h_api.tolist(), "sr": 16000})
    np.testing.assert_array_equal(h_api, h_bare)
    assert np.asarray(doc["outputs"]["h_out"]).shape == (1, 2, 5)


def test_the_body_cap_comes_from_the_model_and_is_listed(api):
    with AgentClient(api["tcp"].url) as c:
        caps = c.model("multi")["max_request_bytes"]
    derived = body_caps(zoo.MULTI_INPUTS, ApiLimits())
    assert caps == {"binary": derived.binary, "json": derived.json}
    assert body_caps(zoo.MULTI_INPUTS, ApiLimits(max_request_bytes=5000)).binary == 5000
    big = (zoo.MULTI_INPUTS[0].__class__("img", "float32", (None, 3, 640, 640)),)
    assert body_caps(big, ApiLimits()).binary > 8 * 3 * 640 * 640 * 4  # 8 images fit


def _four_images_json(cap: int) -> dict:
    """A JSON body just over ``cap`` bytes (as four large images would be)."""
    n = cap // 40 + 1000
    return {"x": np.full((n, 4), 0.123456789, np.float32).tolist(),
            "k": [[1]] * n, "m": [[True] * 4] * n}


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_an_oversized_body_is_a_413_the_python_client_receives(api, kind):
    cap = body_caps(zoo.MULTI_INPUTS, ApiLimits()).json
    doc = _four_images_json(cap)
    with AgentClient(api[kind].url) as c:
        with pytest.raises(ApiError) as err:
            c.predict_json("multi", doc)  # > 1 MiB: sent with Expect: 100-continue
        assert err.value.status == 413 and "cap" in str(err.value)
        assert c.predict_all("multi", zoo.multi_input_feed(1))["y"].shape == (1, 4)


def test_a_client_without_expect_continue_also_reads_the_413(api):
    """Plain http.client sends the whole body; the agent answers 413 without parsing it,
    reads and drops the rest, and the client gets the answer instead of a broken pipe."""
    cap = body_caps(zoo.MULTI_INPUTS, ApiLimits()).json
    body = json.dumps({"inputs": _four_images_json(cap)}).encode()
    assert len(body) > cap
    conn = http.client.HTTPConnection(*api["tcp"].server_address[:2], timeout=30)
    try:
        conn.request("POST", "/v1/models/multi/predict", body=body,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 413 and "cap" in json.loads(resp.read())["message"]
    finally:
        conn.close()
