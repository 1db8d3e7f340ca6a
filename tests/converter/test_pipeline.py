"""The conversion loop end to end: real torch export, real onnxruntime quantization."""

from __future__ import annotations

import numpy as np
import pytest

from edgeship.converter.errors import GateError
from edgeship.agent.manifest import GOLDEN_NAME
from edgeship.converter.bundle import read_bundle_dir
from edgeship.converter.evaluate import open_session, run_batched
from edgeship.converter.gates import Gate
from edgeship.converter.pipeline import convert_digits

METRIC_KEYS = {"accuracy", "accuracy_drop", "agreement", "cosine", "max_abs_diff",
               "latency_p50_ms", "latency_p99_ms", "size_bytes", "samples",
               "memory_bytes", "zstd_size_bytes"}


def test_fp32_and_int8_both_pass_the_default_gate(converted):
    assert converted.shipped == ("onnx-fp32", "onnx-int8")
    assert all(r.passed for r in converted.reports)


def test_int8_is_under_40_percent_of_fp32_size(converted):
    fp32 = converted.manifest.variant("onnx-fp32")
    int8 = converted.manifest.variant("onnx-int8")
    assert int8.size <= 0.4 * fp32.size
    assert int8.metrics["size_bytes"] == int8.size


def test_fp32_matches_torch_and_int8_stays_close(converted, trained):
    fp32 = converted.manifest.variant("onnx-fp32").metrics
    int8 = converted.manifest.variant("onnx-int8").metrics
    assert fp32["max_abs_diff"] < 1e-3 and fp32["agreement"] == 1.0
    assert fp32["accuracy"] == pytest.approx(trained.test_accuracy, abs=1e-6)
    assert int8["accuracy_drop"] <= 1.0 and int8["cosine"] >= 0.99
    assert int8["accuracy"] >= 0.94


def test_manifest_carries_metrics_reference_and_labels(converted, trained):
    m = converted.manifest
    for v in m.variants:
        assert set(v.metrics) == METRIC_KEYS
        assert v.metrics["samples"] == 450 and v.metrics["latency_p50_ms"] > 0
    assert m.reference["accuracy"] == pytest.approx(trained.test_accuracy)
    assert m.reference["samples"] == 450
    assert m.labels == tuple(str(i) for i in range(10))
    assert m.inputs[0].name == "input" and m.inputs[0].shape == (None, 1, 8, 8)
    assert m.outputs[0].name == "logits" and m.outputs[0].shape == (None, 10)


def test_bundle_round_trips_and_golden_outputs_reproduce(converted):
    manifest = read_bundle_dir(converted.bundle_dir)
    assert manifest == converted.manifest
    with np.load(converted.bundle_dir / GOLDEN_NAME) as golden:
        inputs = golden["inputs"]
        assert inputs.shape == (8, 1, 8, 8) and inputs.dtype == np.float32
        for v in manifest.variants:
            out = run_batched(open_session(converted.bundle_dir / v.file), inputs)
            np.testing.assert_allclose(out, golden[v.id], atol=v.golden_atol, rtol=0)
    assert manifest.variant("onnx-fp32").golden_atol == 1e-4
    assert manifest.variant("onnx-int8").golden_atol >= 0.05


def test_impossible_gate_raises_and_leaves_no_output(trained, tmp_path):
    out = tmp_path / "digits-v2"
    impossible = Gate(max_size_bytes=1024)  # both files are tens of KiB
    with pytest.raises(GateError) as err:
        convert_digits(out, version=2, trained=trained, gate=impossible)
    assert set(err.value.failures) == {"onnx-fp32", "onnx-int8"}
    assert list(tmp_path.iterdir()) == []


def test_variant_failing_its_gate_is_left_out_of_the_bundle(trained, tmp_path):
    fp32_only = Gate(min_cosine=0.99999)
    result = convert_digits(tmp_path / "digits-v3", version=3, trained=trained,
                            gate=fp32_only)
    assert result.shipped == ("onnx-fp32",)
    assert not (result.bundle_dir / "model.int8.onnx").exists()
    failed = [r for r in result.reports if not r.passed]
    assert [r.id for r in failed] == ["onnx-int8"] and "cosine" in failed[0].failures[0]
