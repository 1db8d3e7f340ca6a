"""The local API's side of quality: request ids on /v1 and v2, the feedback and quality
routes with their status codes, and the Prometheus families, over real HTTP."""

from __future__ import annotations

import http.client
import json

import numpy as np
import pytest

from edgeship.agent.api import InferenceHTTPServer
from edgeship.agent.metrics import AgentCollector, Metrics
from edgeship.agent.quality.hub import QualityHub
from tests.support.shifts import serve_bundle
from tests.support.synthetic import write_quality_bundle

WIDTH = 16


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    bundle = write_quality_bundle(root / "b", width=WIDTH)
    hub = QualityHub(root / "state")
    server = serve_bundle(bundle, quality=hub)
    metrics = Metrics(AgentCollector(server, None, lambda: {}, {"device": "t"}))
    http_server = InferenceHTTPServer("127.0.0.1", 0, server, metrics_text=metrics.text)
    http_server.start()
    yield http_server
    http_server.stop()
    hub.stop()


def _call(api, method, path, doc=None):
    conn = http.client.HTTPConnection(*api.server_address[:2], timeout=30)
    body = None if doc is None else json.dumps(doc).encode()
    conn.request(method, path, body, {"Content-Type": "application/json"} if body else {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    ctype = resp.getheader("Content-Type") or ""
    return resp.status, dict(resp.getheaders()), json.loads(data) if "json" in ctype else data


def _x(n=1):
    return np.random.default_rng(n).standard_normal((n, WIDTH)).astype(np.float32).tolist()


def test_v1_prediction_carries_an_id_and_feedback_answers_with_the_outcome(api):
    status, headers, doc = _call(api, "POST", "/v1/models/synq/predict", {"inputs": _x()})
    assert status == 200 and doc["id"] == headers["X-Edgeship-Request-Id"]
    label = int(np.argmax(doc["outputs"]["logits"][0]))
    url = "/v1/models/synq/feedback"
    assert _call(api, "POST", url, {"id": doc["id"], "label": label})[0] == 200
    status, _, again = _call(api, "POST", url, {"id": doc["id"], "label": label})
    assert status == 409 and again["status"] == "duplicate"
    boot = doc["id"].split("-")[0]
    assert _call(api, "POST", url, {"id": f"{boot}-99999", "label": 1})[0] == 404
    fresh = _call(api, "POST", "/v1/models/synq/predict", {"inputs": _x()})[2]["id"]
    status, _, bad = _call(api, "POST", url, {"id": fresh, "label": 42})
    assert status == 400 and "0..9" in bad["message"]
    assert _call(api, "POST", url, {"nothing": 1})[0] == 400
    status, _, err = _call(api, "POST", "/v1/models/nope/feedback", {"id": doc["id"]})
    assert status == 404 and "nope" in err["message"]


def test_a_batch_of_feedback_gets_one_result_per_item(api):
    ids = [_call(api, "POST", "/v1/models/synq/predict", {"inputs": _x(2)})[2]["id"]
           for _ in range(3)]
    items = [{"id": ids[0], "labels": [1, 2]}, {"id": ids[1], "labels": [3]},
             {"id": ids[2], "index": 1, "label": "4"}]
    status, _, doc = _call(api, "POST", "/v1/models/synq/feedback", {"items": items})
    assert status == 200 and (doc["accepted"], doc["rejected"]) == (2, 1)
    assert [r["status"] for r in doc["results"]] == ["accepted", "invalid", "accepted"]


def test_v2_response_names_the_prediction_in_its_parameters(api):
    body = {"id": "client-7", "inputs": [{"name": "x", "shape": [1, WIDTH],
                                         "datatype": "FP32", "data": _x()[0]}]}
    status, _, doc = _call(api, "POST", "/v2/models/synq/infer", body)
    assert status == 200 and doc["id"] == "client-7"
    rid = doc["parameters"]["edgeship_request_id"]
    status, _, fb = _call(api, "POST", "/v1/models/synq/feedback", {"id": rid, "label": 0})
    assert status == 200 and fb["status"] == "accepted"
    del body["id"]
    assert _call(api, "POST", "/v2/models/synq/infer", body)[2]["id"].count("-") == 1


def test_quality_route_and_prometheus_show_the_same_numbers(api):
    for _ in range(5):
        _call(api, "POST", "/v1/models/synq/predict", {"inputs": _x(4)})
    status, _, doc = _call(api, "GET", "/v1/models/synq/quality")
    assert status == 200 and doc["profile"] == "ok"
    assert doc["metrics"]["1"]["samples"] >= 4
    est = doc["drift"]["estimate"]
    assert est["method"] == "doc" and est["samples"] > 0 and est["atc"]["samples"] > 0
    status, _, text = _call(api, "GET", "/metrics")
    text = text.decode()
    assert "edgeship_model_estimated_accuracy{" in text
    assert 'edgeship_model_drift_js{model="synq",signal="x:mean",version="1"}' in text
    assert 'edgeship_model_feedback_total{model="synq",outcome="accepted"}' in text
    labelled = doc["metrics"]["1"]
    for key in ("accuracy", "f1_macro"):
        low = float(text.split(f'edgeship_model_labelled_{key}_ci_low{{model="synq",'
                               'version="1"} ')[1].split()[0])
        assert low == pytest.approx(labelled[f"{key}_ci"][0])
    assert labelled["f1_macro_ci_method"].startswith("delta method on the confusion")


def test_labels_collected_offline_go_in_from_a_csv(api, tmp_path, capsys):
    from edgeship.cli import main

    rows = []
    for _ in range(3):
        doc = _call(api, "POST", "/v1/models/synq/predict", {"inputs": _x()})[2]
        rows.append(f"{doc['id']},{int(np.argmax(doc['outputs']['logits'][0]))}")
    path = tmp_path / "labels.csv"
    path.write_text("id,label\n" + "\n".join(rows + ["0badbeef-1,3"]) + "\n")
    url = f"http://127.0.0.1:{api.server_address[1]}"
    assert main(["agent", "feedback", "synq", str(path), "--api", url]) == 1
    out = capsys.readouterr().out
    assert "4 items: accepted 3, unknown 1" in out and "0badbeef-1: unknown" in out
    assert main(["agent", "quality", "synq", "--api", url]) == 0
    assert "estimated accuracy (an ESTIMATE" in capsys.readouterr().out
    bad = tmp_path / "bad.csv"
    bad.write_text("request,truth\nx,1\n")
    assert main(["agent", "feedback", "synq", str(bad), "--api", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgeship: error: ") and "'id' column" in err and err.count("\n") == 1
    # no socket there: a missing file is bad input (exit 2), one line, no traceback
    assert main(["agent", "quality", "synq", "--api", "unix:///nonexistent/agent.sock"]) == 2
    assert capsys.readouterr().err.startswith("edgeship: error: ")


def test_triton_clients_get_the_request_id_over_grpc_and_binary_http(api, tmp_path):
    """The Open Inference Protocol carries the id in the response parameters (gRPC: the
    ModelInferResponse's ``parameters`` map), readable with Triton's own clients."""
    grpcclient = pytest.importorskip("tritonclient.grpc")
    httpclient = pytest.importorskip("tritonclient.http")
    pytest.importorskip("grpc")
    from edgeship.agent.api_limits import ApiLimits
    from edgeship.agent.grpc_api import GrpcInferenceServer

    server = GrpcInferenceServer(api.models, ApiLimits(), socket_path=tmp_path / "grpc.sock")
    server.start()
    try:
        x = np.asarray(_x(), dtype=np.float32)
        g = grpcclient.InferenceServerClient(f"unix://{tmp_path / 'grpc.sock'}")
        t = grpcclient.InferInput("x", list(x.shape), "FP32")
        t.set_data_from_numpy(x)
        response = g.infer("synq", [t]).get_response()
        rid = response.parameters["edgeship_request_id"].string_param
        assert response.id == rid and rid.count("-") == 1
        g.close()
        h = httpclient.InferenceServerClient(f"127.0.0.1:{api.server_address[1]}")
        t = httpclient.InferInput("x", list(x.shape), "FP32")
        t.set_data_from_numpy(x, binary_data=True)
        result = h.infer("synq", [t], request_id="client-1").get_response()
        assert result["id"] == "client-1"
        http_rid = result["parameters"]["edgeship_request_id"]
        h.close()
    finally:
        server.stop()
    for request_id in (rid, http_rid):
        status, _, doc = _call(api, "POST", "/v1/models/synq/feedback",
                               {"id": request_id, "label": 1})
        assert status == 200 and doc["status"] == "accepted"
