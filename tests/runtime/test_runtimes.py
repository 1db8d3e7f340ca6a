"""Runtimes behind one interface: onnxruntime and LiteRT give the same answers through the
agent's ModelServer; the tflite-runtime fallback explains itself when NumPy is too new."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from edgeship.agent import runtime
from edgeship.agent.errors import InferenceInputError
from edgeship.agent.runtime import RuntimeLoadError, choose_providers, load_runtime
from tests.runtime.models import IN_DIM, OUT_DIM, serve, weights, write_dense_onnx


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    pytest.importorskip("onnx")
    d = tmp_path_factory.mktemp("models")
    w, b = weights(3)
    files = {"onnxruntime": write_dense_onnx(d / "dense.onnx", w, b)}
    if importlib.util.find_spec("ai_edge_litert") is not None:
        from tests.runtime.tflite_model import write_dense_tflite
        files["litert"] = write_dense_tflite(d / "dense.tflite", w, b)
    return files, w, b


@pytest.mark.parametrize("name", ["onnxruntime", "litert"])
def test_runtime_serves_through_the_agent_and_matches_numpy(model_files, name):
    files, w, b = model_files
    if name not in files:
        pytest.skip("ai-edge-litert is not installed (pip install 'edgeship[tflite]')")
    server = serve(files[name], name, threads=2)
    for batch in (1, 5, 1):  # LiteRT resizes its input between batch sizes
        x = np.random.default_rng(batch).normal(size=(batch, IN_DIM)).astype(np.float32)
        (y,), loaded = server.predict("dense", x)
        z = x @ w.T + b
        expected = np.exp(z - z.max(1, keepdims=True))
        np.testing.assert_allclose(y, expected / expected.sum(1, keepdims=True), atol=1e-5)
        assert y.shape == (batch, OUT_DIM)
    with pytest.raises(InferenceInputError):
        server.predict("dense", np.ones((1, IN_DIM + 1), np.float32))


def test_litert_loads_only_valid_models(tmp_path):
    pytest.importorskip("ai_edge_litert")
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"not a flatbuffer at all" * 10)
    with pytest.raises(RuntimeLoadError):
        load_runtime("litert", bad)


def test_tflite_runtime_with_numpy_2_is_refused_with_a_clear_message(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        None if name == "ai_edge_litert" else object() if name == "tflite_runtime"
        else real(name, *a)))
    monkeypatch.setattr(runtime, "numpy_major", lambda: 2)
    assert runtime.litert_backend() is None
    assert "litert" not in runtime.available_runtimes()
    with pytest.raises(RuntimeLoadError, match="NumPy < 2"):
        load_runtime("litert", tmp_path / "m.tflite")


def test_no_litert_package_is_a_clear_error(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        None if name in ("ai_edge_litert", "tflite_runtime") else real(name, *a)))
    with pytest.raises(RuntimeLoadError, match="ai-edge-litert"):
        load_runtime("litert", tmp_path / "m.tflite")


def test_unknown_runtime_is_refused(tmp_path):
    with pytest.raises(RuntimeLoadError, match="not available"):
        load_runtime("tensorflow", tmp_path / "m.pb")


@pytest.mark.parametrize("wanted,available,expected", [
    (["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
     ["CUDAExecutionProvider", "CPUExecutionProvider"],
     ("CUDAExecutionProvider", "CPUExecutionProvider")),
    (["CUDAExecutionProvider"], ["CPUExecutionProvider"], ("CPUExecutionProvider",)),
    (["CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"],
     ("CPUExecutionProvider",)),
])
def test_providers_follow_the_profile_and_always_end_on_cpu(wanted, available, expected):
    assert choose_providers(wanted, available) == expected


def test_litert_model_with_a_fixed_batch_of_one_serves_batches_row_by_row(tmp_path):
    pytest.importorskip("ai_edge_litert")
    from tests.runtime.tflite_model import reference, write_dense_tflite

    w, b = weights(5)
    path = write_dense_tflite(tmp_path / "fixed.tflite", w, b, fixed_batch=True)
    server = serve(path, "litert")
    x = np.random.default_rng(2).normal(size=(4, IN_DIM)).astype(np.float32)
    (y,), _ = server.predict("dense", x)
    np.testing.assert_allclose(y, reference(x, w, b), atol=1e-5)
    assert server.get("dense").runtime._slots[0][1] == (1, IN_DIM)  # never resized


def test_onnx_fast_run_matches_the_public_run_and_missing_inputs_are_named(model_files):
    files, w, b = model_files
    model = load_runtime("onnxruntime", files["onnxruntime"])
    x = np.random.default_rng(4).normal(size=(3, IN_DIM)).astype(np.float32)
    (fast,) = model.run({"x": x})
    (public,) = model._session.run(None, {"x": x})
    np.testing.assert_array_equal(fast, public)
    with pytest.raises(ValueError, match=r"Required inputs \(\['x'\]\) are missing"):
        model.run({})  # the public run's check, not a kernel failure deep in the graph
    with pytest.raises(Exception, match="Invalid input name"):
        model.run({"y": x})


def test_onnx_without_a_c_level_session_uses_the_public_run(model_files):
    files, _, _ = model_files
    session = load_runtime("onnxruntime", files["onnxruntime"])._session
    assert runtime._c_level_run(session) == session._sess.run
    stand_in = type("Session", (), {"run": lambda self, names, feed, opts=None: ["public"]})()
    assert runtime._c_level_run(stand_in)(["probs"], {}, None) == ["public"]


def test_serving_checks_values_and_signature_on_both_request_paths(model_files):
    files, w, b = model_files
    server = serve(files["onnxruntime"], "onnxruntime")
    stats = server.stats["dense"]
    x = np.ones((2, IN_DIM), np.float32)
    x[1, 3] = np.nan
    for bad in (x, x.tolist(), {"x": x}, np.full((1, IN_DIM), np.inf, np.float32)):
        with pytest.raises(InferenceInputError, match="NaN or infinity"):
            server.predict("dense", bad, check_values=True)  # what the local API asks
    assert (stats.total_errors, stats.total_model_errors) == (4, 0)  # the caller's fault
    (y,), _ = server.predict("dense", x)  # in-process default: what a bare runtime does
    assert np.isnan(y[1]).all() and np.isfinite(y[0]).all()
    ok = np.ones((3, IN_DIM))  # float64 and a list: converted on the general path
    for good in (ok, ok.tolist(), np.asfortranarray(ok, np.float32)):
        (y,), _ = server.predict("dense", good)
        assert y.shape == (3, OUT_DIM)
    for bad, message in ((np.ones((1, IN_DIM + 1), np.float32), "expected shape"),
                         (np.ones(IN_DIM, np.float32), "expected rank"),
                         (np.ones((1025, IN_DIM), np.float32), "exceeds 1024"),
                         (np.ones((1, IN_DIM), np.complex64), "cannot be used as float32")):
        with pytest.raises(InferenceInputError, match=message):
            server.predict("dense", bad)
