"""Graphs shaped like the ones users bring go convert → release → agent → local API against
a real broker, and what the API serves equals a bare runtime on the same variant file
(max abs diff 0): a YOLO-style detector (dynamic H/W), a GRU with a state input and an int64
scalar run step by step, the MiniLM encoder (three int64 inputs), a PaddlePaddle-style
opset-11 graph with Constant-node weights, a tf2onnx-style NHWC graph, a fixed batch-1
model and a .tflite with two outputs."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.support.loop_env import predict_named
from tests.zoo.conftest import run_convert

pytestmark = pytest.mark.timeout(600)
DEVICE = "pi-zoo"


@pytest.fixture(scope="module")
def agent(fleet):
    return fleet.start_agent(DEVICE, profile="rpi4", trial_window_s=1.0)


def _ship(fleet, zoo_model, tmp_path, capsys, *extra: str) -> dict:
    """Convert with the rpi4 defaults, release, wait until the agent serves it."""
    source = "tflite" if zoo_model.path.suffix == ".tflite" else "onnx"
    argv = [source, str(zoo_model.path), "--out", str(tmp_path), "--name", zoo_model.name,
            "--device", "rpi4", "--no-tar", *extra]
    if zoo_model.data is not None:
        argv += ["--calib", str(zoo_model.data), "--val", str(zoo_model.val)]
    code, result, err = run_convert(argv, capsys)
    assert code == 0, (result, err)
    fleet.release(result["bundle_dir"])
    event = fleet.watcher.wait_for(lambda e: e.get("device") == DEVICE and
                                   e.get("model") == zoo_model.name and
                                   e.get("event") == "serving", 180)
    return {"result": result, "event": event}


def _bare_onnx(agent, model: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = agent.updates.steps.traits.threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    path = agent.store.active(model).model_path
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda feed: dict(zip(names, session.run(None, feed)))


def _feeds(zoo_model, count: int = 2) -> list[dict[str, np.ndarray]]:
    with np.load(zoo_model.val) as data:
        return [{k: np.asarray(data[k][i]) for k in data.files if k != "y"}
                for i in range(count)]


def _served_equals_bare(agent, name: str, feeds, bare) -> dict:
    for feed in feeds:
        served = predict_named(agent, name, feed)
        want = bare(feed)
        assert set(served["outputs"]) == set(want)
        for out, value in want.items():
            got = np.asarray(served["outputs"][out], dtype=value.dtype)
            assert got.shape == value.shape, out
            assert np.max(np.abs(got.astype(np.float64) - value)) == 0.0, out
    return served


def test_yolo_detector_with_dynamic_height_and_width(fleet, agent, yolo, tmp_path, capsys,
                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)  # symbolic shape inference fails here: it litters the cwd
    shipped = _ship(fleet, yolo, tmp_path / "out", capsys)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    variants = {v["id"]: v for v in shipped["result"]["variants"]}
    assert variants["onnx-int8"]["passed"], variants["onnx-int8"]
    assert variants["onnx-int8"]["notes"]["pre_process"] != "symbolic"  # it fails here
    assert shipped["result"]["task"] == "detection"
    feeds = _feeds(yolo)
    bigger = {"images": np.zeros((1, 3, 96, 128), np.float32) + 0.5}  # another H/W
    served = _served_equals_bare(agent, "yolo", [*feeds, bigger], _bare_onnx(agent, "yolo"))
    assert np.asarray(served["outputs"]["output0"]).shape[2] == 12 * 16 + 6 * 8 + 3 * 4


def test_gru_with_state_and_int64_scalar_runs_step_by_step(fleet, agent, vad, tmp_path,
                                                           capsys):
    shipped = _ship(fleet, vad, tmp_path, capsys)
    assert any(v["passed"] and v["precision"].startswith("int8")
               for v in shipped["result"]["variants"])
    bare = _bare_onnx(agent, "vad")
    audio = _feeds(vad, 4)
    state = np.zeros((1, 1, 32), np.float32)
    bare_state = state
    for chunk in audio:  # the client passes the state it got back into the next call
        feed = {"input": chunk["input"], "state": state, "sr": np.array(16000, np.int64)}
        served = predict_named(agent, "vad", feed)
        want = bare({**feed, "state": bare_state})
        state = np.asarray(served["outputs"]["stateN"], np.float32)
        bare_state = want["stateN"]
        assert np.array_equal(state, bare_state)
        assert np.array_equal(np.asarray(served["outputs"]["output"], np.float32),
                              want["output"])
    assert np.abs(state).sum() > 0


def test_minilm_encoder_with_three_int64_inputs(fleet, agent, minilm, tmp_path, capsys):
    shipped = _ship(fleet, minilm, tmp_path, capsys, "--variants",
                    "onnx-fp32,onnx-int8-dynamic")
    result = shipped["result"]
    assert result["task"] == "embedding"
    assert {v["id"] for v in result["variants"] if v["passed"]} == {"onnx-fp32",
                                                                   "onnx-int8-dynamic"}
    assert shipped["event"]["variant"] == "onnx-int8-dynamic"
    _served_equals_bare(agent, "minilm", _feeds(minilm, 1), _bare_onnx(agent, "minilm"))
    # the reference profile covers all three int64 inputs, and the agent sketches them live
    names = {"input_ids", "attention_mask", "token_type_ids"}
    manifest = json.loads((Path(result["bundle_dir"]) / "manifest.json").read_text())
    profiled = {s["name"].split(":")[0] for s in manifest["profile"]["signals"]}
    assert names <= profiled, profiled
    with urllib.request.urlopen(f"{agent.api.url}/v1/models/minilm/quality",
                                timeout=30) as resp:
        quality = json.loads(resp.read())
    assert quality["profile"] == "ok", quality
    live = {n.split(":")[0] for n in quality["drift"]["signals"]}
    assert names <= live and quality["drift"]["samples"] >= 1, quality["drift"]


def test_paddle_style_opset11_graph_with_constant_weights(fleet, agent, ocr, tmp_path,
                                                          capsys):
    shipped = _ship(fleet, ocr, tmp_path, capsys)
    assert shipped["result"]["task"] == "sequence"  # [N, steps (dynamic), classes]
    variants = {v["id"]: v for v in shipped["result"]["variants"]}
    assert variants["onnx-int8"]["passed"]  # calibrated, Constant weights as initializers
    assert variants["onnx-int8"]["metrics"]["agreement"] >= 0.97  # per step
    assert shipped["event"]["variant"] == "onnx-int8"
    _served_equals_bare(agent, "ocr_rec", _feeds(ocr), _bare_onnx(agent, "ocr_rec"))


def test_tf2onnx_style_graph_with_nhwc_and_odd_names(fleet, agent, tf_seg, tmp_path, capsys):
    shipped = _ship(fleet, tf_seg, tmp_path, capsys)
    assert shipped["result"]["task"] == "segmentation"
    _served_equals_bare(agent, "tf_seg", _feeds(tf_seg), _bare_onnx(agent, "tf_seg"))


def test_fixed_batch_one_model(fleet, agent, fixed1, tmp_path, capsys):
    shipped = _ship(fleet, fixed1, tmp_path, capsys)
    result = shipped["result"]
    assert result["task"] == "classification" and result["reference_accuracy"] == 1.0
    with np.load(fixed1.data) as data:
        feeds = [{"data": data["x"][i:i + 1]} for i in range(2)]
    _served_equals_bare(agent, "fixed1", feeds, _bare_onnx(agent, "fixed1"))


def test_tflite_with_two_outputs(fleet, agent, face, tmp_path, capsys):
    from ai_edge_litert.interpreter import Interpreter

    from edgeship.agent.runtime import tensor_affine, dequantize, ordered_outputs, quantize

    shipped = _ship(fleet, face, tmp_path, capsys)
    assert shipped["event"]["variant"].startswith("tflite-")
    path = agent.store.active("face").model_path
    it = Interpreter(model_path=str(path), num_threads=agent.updates.steps.traits.threads)
    it.allocate_tensors()
    (inp,) = it.get_input_details()
    outs = ordered_outputs(it)

    def bare(feed):  # a full-integer variant takes int8: quantized with its own params
        it.set_tensor(inp["index"], quantize(feed[inp["name"]], tensor_affine(inp)))
        it.invoke()
        return {d["name"]: dequantize(it.get_tensor(d["index"]), tensor_affine(d)) for d in outs}

    served = _served_equals_bare(agent, "face", _feeds(face), bare)
    assert [np.asarray(v).shape[-1] for v in served["outputs"].values()] == [16, 1]
