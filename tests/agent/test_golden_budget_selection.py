"""Device-side pieces for real models (pure, no broker): the golden file keyed by tensor
name and bounded in size, the health check over every input and output with per-output
tolerances, the release's latency budget, and variant choice from measurements."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from edgeship.agent.budget import DERIVED_HEADROOM, latency_budget
from edgeship.agent.errors import BundleError, HealthCheckError, Reason
from edgeship.agent.golden import budget_bytes, load_golden, pack, pattern
from edgeship.agent.health import check_health
from edgeship.agent.manifest import Manifest, TensorSpec, Variant
from edgeship.agent.selection import select_variant

SHA = "0" * 64
INPUTS = (TensorSpec("input_ids", "int64", (None, None)),
          TensorSpec("state", "float32", (1, None, 4)),
          TensorSpec("sr", "int64", ()))
OUTPUTS = (TensorSpec("out:0", "float32", (None, 3)), TensorSpec("stateN", "float32",
                                                                 (1, None, 4)))


def _variant(vid="onnx-fp32", precision="fp32", p50=None, tolerances=None, runtime=None):
    metrics = {} if p50 is None else {"latency_p50_ms": p50}
    return Variant(vid, runtime or ("litert" if vid.startswith("tflite") else "onnxruntime"),
                   precision, f"model.{vid}.bin", SHA, 100, metrics,
                   golden_tolerances=tolerances or {})


def _manifest(variants, budget=None, measured_on=None) -> Manifest:
    return Manifest("m", 1, "generic", INPUTS, OUTPUTS, tuple(variants), "golden.npz", SHA,
                    1, latency_budget_ms=budget, measured_on=measured_on or {})


class _Model:
    """A 'runtime' computing outputs from every input: y = ids.sum + state.sum + sr/1000."""

    def __init__(self, bias: float = 0.0, nan: bool = False):
        self.bias, self.nan, self.calls = bias, nan, []

    def run(self, feed):
        self.calls.append({k: v.copy() for k, v in feed.items()})
        total = feed["input_ids"].sum() + feed["state"].sum() + feed["sr"] / 1000
        y = np.full((feed["input_ids"].shape[0], 3), total + self.bias, np.float32)
        if self.nan:
            y[0, 0] = np.nan
        return [y, feed["state"] + 1]


def _golden(tmp_path: Path, samples: int = 3, budget: int = 1_000_000) -> Path:
    rng = np.random.default_rng(0)
    inputs = {"input_ids": rng.integers(0, 100, (samples, 1, 5)),
              "state": rng.random((samples, 1, 1, 4), dtype=np.float32),
              "sr": np.full(samples, 16000, np.int64)}
    model = _Model()
    outs = [model.run({k: v[i] for k, v in inputs.items()}) for i in range(samples)]
    arrays = pack(inputs, {}, {"onnx-fp32": {"out:0": [o[0] for o in outs],
                                             "stateN": [o[1] for o in outs]}}, budget)
    path = tmp_path / "golden.npz"
    np.savez(path, **arrays)
    return path


def test_golden_file_is_keyed_by_tensor_name_and_feeds_every_input(tmp_path):
    path = _golden(tmp_path)
    with np.load(path) as data:
        assert {"in:input_ids", "in:state", "in:sr", "out:onnx-fp32:out:0",
                "out:onnx-fp32:stateN"} <= set(data.files)
    golden = load_golden(path, "onnx-fp32", INPUTS, ["out:0", "stateN"])
    assert len(golden) == 3
    assert golden.feeds[0]["sr"].shape == () and golden.feeds[0]["sr"].dtype == np.int64
    assert golden.feeds[1]["state"].shape == (1, 1, 4)


def test_health_check_runs_every_sample_and_compares_every_output(tmp_path):
    path = _golden(tmp_path)
    v = _variant(tolerances={"out:0": 1e-4, "stateN": 1e-4})
    model = _Model()
    report = check_health(model, _manifest([v]), v, path)
    assert report.samples == 3 and report.max_abs_diff == 0.0  # rows checked
    assert {tuple(sorted(c)) for c in model.calls} == {("input_ids", "sr", "state")}


def test_each_output_has_its_own_tolerance(tmp_path):
    path = _golden(tmp_path)
    loose = _variant(tolerances={"out:0": 1.0, "stateN": 1e-4})
    assert check_health(_Model(bias=0.5), _manifest([loose]), loose, path).max_abs_diff == 0.5
    tight = _variant(tolerances={"out:0": 0.1, "stateN": 1e-4})
    with pytest.raises(HealthCheckError) as err:
        check_health(_Model(bias=0.5), _manifest([tight]), tight, path)
    assert err.value.reason_code == Reason.GOLDEN_MISMATCH and "out:0" in str(err.value)


def test_nan_in_any_output_is_refused(tmp_path):
    path = _golden(tmp_path)
    v = _variant(tolerances={"out:0": 1.0, "stateN": 1.0})
    with pytest.raises(HealthCheckError) as err:
        check_health(_Model(nan=True), _manifest([v]), v, path)
    assert err.value.reason_code == Reason.NONFINITE_OUTPUT


def test_latency_over_the_release_budget_names_both_numbers(tmp_path):
    path = _golden(tmp_path)
    v = _variant(tolerances={"out:0": 1e-4, "stateN": 1e-4})
    with pytest.raises(HealthCheckError) as err:
        check_health(_Model(), _manifest([v]), v, path, latency_budget_ms=1e-9,
                     budget_source="the release's budget")
    assert err.value.reason_code == Reason.LATENCY_BUDGET_EXCEEDED
    assert " ms > 0.0 ms (the release's budget)" in str(err.value)


def test_outputs_too_large_are_strided_and_the_file_stays_in_budget():
    big = [np.arange(400_000, dtype=np.float32) + k for k in range(4)]  # 6.4 MB of outputs
    arrays = pack({"x": np.zeros((4, 1, 8), np.float32)}, {},
                  {"a": {"y": big}, "b": {"y": big}}, 1_000_000)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    assert len(buf.getvalue()) <= 1_000_000
    stride = int(arrays["stride:a:y"])
    assert stride > 1 and tuple(arrays["shape:a:y"]) == (400_000,)
    np.testing.assert_array_equal(arrays["out:a:y"][2], big[2][::stride])


def test_golden_budget_is_the_larger_of_1mb_and_10_percent_of_the_model():
    assert budget_bytes(3_000_000) == 1_000_000
    assert budget_bytes(90_000_000) == 9_000_000


def test_patterns_are_the_same_bits_every_time_and_respect_dtype_and_range():
    a = pattern((2, 3, 4), "float32", -1.0, 1.0, 7)
    assert np.array_equal(a, pattern((2, 3, 4), "float32", -1.0, 1.0, 7))
    assert a.dtype == np.float32 and a.min() >= -1 and a.max() <= 1 and a.std() > 0.3
    ids = pattern((50,), "int64", 0, 9, 1)
    assert ids.dtype == np.int64 and set(ids) <= set(range(10)) and len(set(ids)) > 5
    assert pattern((), "bool", 0, 1, 3).shape == ()


def test_legacy_golden_with_inputs_and_variant_arrays_still_loads(tmp_path):
    path = tmp_path / "old.npz"
    np.savez(path, inputs=np.ones((8, 4), np.float32), **{"onnx-fp32": np.zeros((8, 3))})
    specs = (TensorSpec("x", "float32", (None, 4)),)
    golden = load_golden(path, "onnx-fp32", specs, ["y"])
    assert golden.feeds[0]["x"].shape == (8, 4) and golden.expected["y"].shape == (1, 8, 3)


def test_manifest_round_trips_budget_tolerances_and_new_dtypes():
    v = _variant(tolerances={"out:0": 0.25})
    m = _manifest([v], budget=80.0, measured_on={"arch": "x86_64"})
    back = Manifest.from_bytes(m.to_bytes())
    assert back.latency_budget_ms == 80.0 and back.measured_on == {"arch": "x86_64"}
    assert back.variants[0].tolerance("out:0") == 0.25
    assert back.variants[0].tolerance("stateN") == back.variants[0].golden_atol
    raw = m.to_dict()
    raw["inputs"].append({"name": "flag", "dtype": "bool", "shape": []})
    assert Manifest.from_dict(raw).inputs[-1].dtype == "bool"
    raw["latency_budget_ms"] = -1
    with pytest.raises(BundleError):
        Manifest.from_dict(raw)


@pytest.mark.parametrize("budget, p50, expected, source", [
    (80.0, 5.0, 80.0, "the release's budget"),
    (None, 5.0, 5.0 * 8 * DERIVED_HEADROOM, "derived"),
    (None, 0.05, 20.0, "the board profile's default"),  # never below the default
    (None, None, 20.0, "the board profile's default"),
])
def test_latency_budget_belongs_to_the_release(budget, p50, expected, source):
    v = _variant(p50=p50)
    got = latency_budget(_manifest([v], budget=budget), v, 20.0, 8.0)
    assert got.ms == pytest.approx(expected) and got.source.startswith(source)


def _pick(variants, arch="aarch64", measured_arch="x86_64", use=True):
    m = _manifest(variants, measured_on={"arch": measured_arch})
    return select_variant(m, ("int8-static", "int8-dynamic", "fp32"),
                          ("onnxruntime", "litert"), arch, use_measurements=use).id


def test_a_variant_measured_much_slower_is_never_preferred():
    variants = [_variant("onnx-int8-dynamic", "int8-dynamic", p50=48.0),
                _variant("onnx-fp32", "fp32", p50=0.8)]
    assert _pick(variants) == "onnx-fp32"
    assert _pick(variants, use=False) == "onnx-int8-dynamic"  # GPU boards: profile order


def test_small_gaps_count_only_on_a_cpu_of_the_devices_kind():
    variants = [_variant("onnx-int8", "int8-static", p50=0.93),
                _variant("onnx-fp32", "fp32", p50=0.81)]
    assert _pick(variants, arch="aarch64") == "onnx-int8"  # measured on x86: 1.15x is noise
    assert _pick(variants, arch="x86_64") == "onnx-fp32"  # measured on this kind of CPU


def test_a_gap_of_a_few_microseconds_never_decides():
    variants = [_variant("onnx-int8", "int8-static", p50=0.036),  # 1.3x, but 8 µs: noise
                _variant("onnx-fp32", "fp32", p50=0.028)]
    assert _pick(variants, arch="x86_64") == "onnx-int8"  # the profile's order
    variants = [_variant("onnx-int8", "int8-static", p50=0.36),  # 1.3x and 80 µs
                _variant("onnx-fp32", "fp32", p50=0.28)]
    assert _pick(variants, arch="x86_64") == "onnx-fp32"


def test_only_variants_of_the_same_runtime_are_compared():
    variants = [_variant("tflite-int8", "int8-static", p50=5.0),
                _variant("onnx-fp32", "fp32", p50=0.5)]
    assert _pick(variants) == "tflite-int8"
