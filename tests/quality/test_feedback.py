"""Feedback and sketches through a real ModelServer (onnxruntime) with the QualityHub:
request ids, labels posted later (one, batched, by name, offline batches), counted once,
kept across a restart, bounded memory and disk with counted eviction, drift on shifted
inputs."""

from __future__ import annotations

import numpy as np
import pytest

from edgeship.agent.quality.drift import WindowSettings
from edgeship.agent.quality.feedback import FeedbackError
from edgeship.agent.quality.hub import QualityHub, QualitySettings
from tests.support.shifts import serve_bundle
from tests.support.synthetic import write_quality_bundle

WIDTH = 16


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return write_quality_bundle(tmp_path_factory.mktemp("q") / "b", width=WIDTH)


@pytest.fixture
def served(bundle, tmp_path):
    hub = QualityHub(tmp_path, QualitySettings(window=WindowSettings(4, 64)))
    server = serve_bundle(bundle, quality=hub)
    yield server, hub
    hub.stop()


def _x(n, shift=0.0, seed=1):
    return (np.random.default_rng(seed).standard_normal((n, WIDTH)) + shift).astype(np.float32)


def _predict(server, x):
    out, _, rid = server.predict_tracked("synq", x)
    return out[0].argmax(1), rid


def test_every_prediction_has_an_id_and_feedback_yields_per_version_metrics(served):
    server, hub = served
    truths, ids = [], []
    for i, row in enumerate(_x(40)):
        pred, rid = _predict(server, row[None])
        ids.append(rid)
        truths.append(int(pred[0]) if i % 4 else (int(pred[0]) + 1) % 10)  # 75 % right
    assert len(set(ids)) == 40
    results = hub.feedback("synq", {"items": [{"id": r, "label": t}
                                              for r, t in zip(ids, truths)]})
    assert {r["status"] for r in results} == {"accepted"}
    rep = hub.local_report("synq", 1, "onnx-fp32", tuple(str(i) for i in range(10)))
    m = rep["metrics"]["1"]
    assert m["samples"] == 40 and m["accuracy"] == pytest.approx(0.75)
    assert m["accuracy_ci"][0] < 0.75 < m["accuracy_ci"][1]
    assert m["f1_macro"] is not None and rep["feedback"]["accepted"] == 40


def test_batches_names_indexes_and_every_kind_of_refusal(served):
    server, hub = served
    pred, rid = _predict(server, _x(3))
    names = [str(int(p)) for p in pred]
    assert hub.feedback("synq", {"id": rid, "labels": names})[0]["status"] == "accepted"
    assert hub.feedback("synq", {"id": rid, "index": 1, "label": 0})[0]["status"] == \
        "duplicate"
    _, single = _predict(server, _x(1, seed=2))
    boot = single.split("-")[0]
    cases = {
        "unknown": {"id": f"{boot}-999999", "label": 1},
        "other boot": {"id": "0badbeef-0", "label": 1},
        "out of range": {"id": single, "label": 10},
        "bad name": {"id": single, "label": "eleven"},
        "boolean": {"id": single, "label": True},
        "two keys": {"id": single, "label": 1, "value": 2},
        "not an id": {"id": "abc", "label": 1},
    }
    got = {k: hub.feedback("synq", v)[0] for k, v in cases.items()}
    assert got["unknown"]["status"] == got["other boot"]["status"] == "unknown"
    assert {got[k]["status"] for k in ("out of range", "bad name", "boolean", "two keys",
                                       "not an id")} == {"invalid"}
    assert "0..9" in got["out of range"]["message"]
    _, batch = _predict(server, _x(2, seed=3))
    wrong = hub.feedback("synq", {"id": batch, "labels": [1, 2, 3]})[0]
    assert wrong["status"] == "invalid" and "2 sample" in wrong["message"]
    one = hub.feedback("synq", {"id": batch, "label": 1})[0]
    assert one["status"] == "invalid" and "several samples" in one["message"]
    assert hub.feedback("synq", {"id": single, "label": "3"})[0]["status"] == "accepted"
    for bad in ([], {"items": []}, {"items": "x"}):
        with pytest.raises(FeedbackError):
            hub.feedback("synq", bad)
    counters = hub.store.counters("synq")
    assert counters["accepted"] == 2 and counters["unknown"] == 2 and counters["invalid"] >= 7


def test_labels_posted_after_a_restart_still_count_once(bundle, tmp_path):
    hub = QualityHub(tmp_path)
    server = serve_bundle(bundle, quality=hub)
    preds, ids = [], []
    for row in _x(10):
        p, rid = _predict(server, row[None])
        preds.append(int(p[0]))
        ids.append(rid)
    hub.stop()  # the agent stops; the predictions are on disk
    hub2 = QualityHub(tmp_path)
    serve_bundle(bundle, quality=hub2)  # serving again, new boot id
    items = [{"id": r, "label": p} for r, p in zip(ids, preds)]
    assert {r["status"] for r in hub2.feedback("synq", {"items": items})} == {"accepted"}
    assert {r["status"] for r in hub2.feedback("synq", {"items": items})} == {"duplicate"}
    hub2.stop()
    hub3 = QualityHub(tmp_path)
    counts = hub3.store.counts("synq")[1]
    assert counts["n"] == 10 and sum(counts["tp"]) == 10
    hub3.stop()


def test_memory_and_disk_are_bounded_and_evictions_counted(bundle, tmp_path):
    hub = QualityHub(tmp_path, QualitySettings(memory_samples=130, disk_samples=150,
                                               flush_interval_s=3600))
    server = serve_bundle(bundle, quality=hub)
    first = None
    for i in range(6):
        _, rid = _predict(server, _x(64, seed=i))  # 384 samples, no flush in between
        first = first or rid
        hub.fold_all()
    assert hub._waiting_samples <= 130
    hub.flush()
    counters = hub.store.counters("synq")
    assert counters["evicted_memory"] == 384 - 128  # two 64-sample chunks fit in memory
    assert counters["pending_disk"] == 128
    for i in range(3):
        _predict(server, _x(64, seed=10 + i))
    hub.flush()
    counters = hub.store.counters("synq")
    assert hub.store.rows <= 150 and counters["pending_disk"] == 150
    assert counters["evicted_disk"] == 128 + 192 - 150
    assert hub.feedback("synq", {"id": first, "labels": [0] * 64})[0]["status"] == "unknown"
    hub.stop()


def test_shifted_inputs_raise_drift_and_same_distribution_does_not(served):
    server, hub = served
    for row in _x(256, seed=4):
        server.predict("synq", row[None])
    same = hub.telemetry({"synq": (1, "onnx-fp32")})["synq"]["drift"]
    for row in _x(256, shift=1.0, seed=5):
        server.predict("synq", row[None])
    shifted = hub.telemetry({"synq": (1, "onnx-fp32")})["synq"]["drift"]
    assert same["samples"] == shifted["samples"] == 256  # the window: 4 blocks of 64
    worst_same = max(s["js"] for s in same["signals"].values())
    assert worst_same < 0.25
    assert shifted["signals"]["x:mean"]["js"] > 0.6
    assert same["signals"]["x:mean"]["chance"] > 0
    est = same["estimate"]
    assert est["method"] == "doc" and 0.75 < est["accuracy"] < 1.0
    assert est["above"] == round(est["accuracy"] * est["samples"])  # what the fleet pools
    assert est["atc"]["method"] == "atc" and 0.75 < est["atc"]["accuracy"] < 1.0
    assert "x" not in str(shifted.get("raw", ""))  # counts and scores only


def test_a_bundle_from_before_doc_is_served_with_the_atc_estimate(bundle, tmp_path):
    """A manifest whose profile has no mean_confidence still loads: the agent estimates
    with ATC, as it did before DoC."""
    import json
    import shutil

    from edgeship.agent.manifest import MANIFEST_NAME

    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    doc = json.loads((old / MANIFEST_NAME).read_text())
    estimate = doc["profile"]["estimate"]
    assert "mean_confidence" in estimate  # what the converter writes today
    for part in (estimate, *estimate.get("variants", {}).values()):
        part.pop("mean_confidence", None)
    (old / MANIFEST_NAME).write_text(json.dumps(doc))
    hub = QualityHub(tmp_path / "state", QualitySettings(window=WindowSettings(4, 64)))
    server = serve_bundle(old, quality=hub)
    for row in _x(128, seed=4):
        server.predict("synq", row[None])
    est = hub.telemetry({"synq": (1, "onnx-fp32")})["synq"]["drift"]["estimate"]
    hub.stop()
    assert est["method"] == "atc" and est["samples"] == 128 and "atc" not in est
    assert 0.75 < est["accuracy"] < 1.0 and est["above"] == round(est["accuracy"] * 128)


def test_without_quality_the_server_behaves_as_before(bundle):
    server = serve_bundle(bundle)
    out, loaded, rid = server.predict_tracked("synq", _x(1))
    assert rid is None and out[0].shape == (1, 10)
