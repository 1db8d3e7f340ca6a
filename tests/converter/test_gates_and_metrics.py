"""Pure pieces: gate checks, output comparison, latency percentiles, settings checks."""

from __future__ import annotations

import numpy as np
import pytest

from edgeship.agent.errors import ConfigError
from edgeship.converter.evaluate import (VariantMetrics, compare_outputs, latency_percentiles,
                                top1_accuracy)
from edgeship.converter.errors import EvaluationError
from edgeship.converter.gates import Gate, check_gate
from edgeship.converter.quantize import ArrayCalibrationReader, QuantizeSettings


def _metrics(**changes) -> VariantMetrics:
    base = dict(accuracy=0.97, accuracy_drop=0.2, agreement=0.99, cosine=0.999,
                max_abs_diff=0.5, latency_p50_ms=0.1, latency_p99_ms=0.3,
                size_bytes=50_000, samples=450)
    return VariantMetrics(**{**base, **changes})


def test_good_variant_passes_default_gate():
    assert check_gate(_metrics(), Gate()) == []


@pytest.mark.parametrize("changes, needle", [
    ({"accuracy_drop": 1.5}, "accuracy drop"),
    ({"agreement": 0.9}, "agreement"),
    ({"cosine": 0.95}, "cosine"),
])
def test_each_threshold_reports_its_own_failure(changes, needle):
    failures = check_gate(_metrics(**changes), Gate())
    assert len(failures) == 1 and needle in failures[0]


def test_optional_size_and_latency_limits():
    gate = Gate(max_size_bytes=40_000, max_latency_p99_ms=0.2)
    failures = check_gate(_metrics(), gate)
    assert [f.split()[0] for f in failures] == ["size", "p99"]


def test_nonsense_gate_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError) as err:
        Gate(min_agreement=1.5)
    assert err.value.key == "min_agreement"


def test_metrics_to_dict_has_the_manifest_keys_as_floats():
    d = _metrics().to_dict()
    assert set(d) == {"accuracy", "accuracy_drop", "agreement", "cosine", "max_abs_diff",
                      "latency_p50_ms", "latency_p99_ms", "size_bytes", "samples", "memory_bytes"}
    assert all(isinstance(v, float) for v in d.values())


def test_compare_outputs_counts_top1_disagreement_and_max_diff():
    ref = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0]], dtype=np.float32)
    out = ref.copy()
    out[3] = [3.0, 0.0]
    cmp = compare_outputs(out, ref)
    assert cmp.agreement == 0.75
    assert cmp.max_abs_diff == 3.0
    assert cmp.cosine == pytest.approx(0.75)


def test_compare_outputs_rejects_mismatched_shapes():
    with pytest.raises(EvaluationError):
        compare_outputs(np.zeros((3, 10)), np.zeros((4, 10)))


def test_top1_accuracy_and_latency_percentiles():
    outputs = np.eye(4, dtype=np.float32)
    assert top1_accuracy(outputs, np.array([0, 1, 2, 0])) == 0.75
    p50, p99 = latency_percentiles([0.001] * 99 + [0.1])
    assert p50 == pytest.approx(1.0) and p99 > 1.0


def test_calibration_reader_yields_every_sample_once_then_none():
    images = np.arange(5 * 4, dtype=np.float32).reshape(5, 1, 2, 2)
    reader = ArrayCalibrationReader(images, batch_size=2)
    batches = []
    while (feed := reader.get_next()) is not None:
        batches.append(feed["input"])
    assert [len(b) for b in batches] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    reader.rewind()
    assert reader.get_next() is not None


def test_unknown_calibration_method_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        QuantizeSettings(calibration_method="magic")
    assert err.value.key == "calibration_method"
