"""Pure pieces: per-output comparison, task inference, gate checks, calibration reader."""

from __future__ import annotations

import numpy as np
import pytest

from edgeship.agent.errors import ConfigError
from edgeship.converter.evaluate import VariantMetrics, latency_percentiles
from edgeship.converter.gates import Gate, check_gate
from edgeship.converter.metrics import (OutputMetrics, attention_masks, compare, infer_task,
                                        top1_accuracy)
from edgeship.converter.quantize import QuantizeSettings, SamplesCalibrationReader
from edgeship.converter.samples import Outputs, Samples, TensorInfo


def _out(name="logits", cosine=0.999, agreement=0.99, snr=30.0, **kw) -> OutputMetrics:
    return OutputMetrics(name, kw.get("shape_ok", True), kw.get("diff", 0.5), cosine,
                         cosine, snr, agreement, kw.get("exact", False))


def _metrics(outputs=None, accuracy=0.97, reference_accuracy=0.972, **kw) -> VariantMetrics:
    return VariantMetrics(tuple(outputs or [_out()]), kw.get("p50", 0.1), kw.get("p99", 0.3),
                          kw.get("size", 50_000), 450, "classification", accuracy,
                          reference_accuracy)


def test_good_variant_passes_default_gate():
    assert check_gate(_metrics(), Gate()) == []


@pytest.mark.parametrize("metrics, gate_name", [
    (_metrics(accuracy=0.955), "accuracy_drop"),
    (_metrics([_out(agreement=0.9)]), "agreement"),
    (_metrics([_out(cosine=0.95)]), "cosine"),
    (_metrics([_out(shape_ok=False)]), "shape"),
    (_metrics([_out(exact=True, agreement=0.5)]), "exact"),
])
def test_each_threshold_reports_its_own_structured_failure(metrics, gate_name):
    failures = check_gate(metrics, Gate())
    assert [f.gate for f in failures] == [gate_name]
    assert failures[0].to_dict()["gate"] == gate_name and str(failures[0])


def test_every_output_is_checked_and_every_failure_collected():
    metrics = _metrics([_out("boxes", cosine=0.9, agreement=None),
                        _out("scores", cosine=0.98, agreement=None), _out("ok")])
    failures = check_gate(metrics, Gate())
    assert [(f.gate, f.output) for f in failures] == [("cosine", "boxes"),
                                                       ("cosine", "scores")]
    assert failures[0].measured == 0.9 and failures[0].limit == 0.99
    assert str(failures[0]) == "cosine[boxes] 0.9 < 0.99"


def test_optional_size_latency_and_snr_limits():
    gate = Gate(max_size_bytes=40_000, max_latency_p99_ms=0.2, min_snr_db=40)
    assert [f.gate for f in check_gate(_metrics(), gate)] == ["snr_db", "size",
                                                              "latency_p99"]


def test_without_labels_there_is_no_accuracy_drop_to_gate():
    metrics = _metrics(accuracy=None, reference_accuracy=None)
    assert metrics.accuracy_drop is None and check_gate(metrics, Gate()) == []
    assert "accuracy" not in metrics.to_dict() and "agreement" in metrics.to_dict()


def test_nonsense_gate_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError) as err:
        Gate(min_agreement=1.5)
    assert err.value.key == "min_agreement"


def _outputs(*samples) -> Outputs:
    return Outputs(("y",), [(np.asarray(s, np.float32),) for s in samples])


def test_classification_counts_top1_disagreement_cosine_and_max_diff():
    ref = _outputs([[1.0, 0.0]], [[0.0, 1.0]], [[2.0, 1.0]], [[0.0, 3.0]])
    got = _outputs([[1.0, 0.0]], [[0.0, 1.0]], [[2.0, 1.0]], [[3.0, 0.0]])
    (m,) = compare(got, ref, "classification")
    assert m.agreement == 0.75 and m.max_abs_diff == 3.0
    assert m.cosine == pytest.approx(0.75) and m.cosine_min == pytest.approx(0.0)


def test_tasks_without_an_argmax_have_no_agreement():
    ref = _outputs([[1.0, 0.0]])
    (m,) = compare(ref, ref, "embedding")
    assert m.agreement is None and m.cosine == 1.0 and m.snr_db == 200.0


def test_segmentation_agreement_is_per_pixel_on_the_class_axis():
    rng = np.random.default_rng(0)
    nchw = rng.random((1, 3, 4, 4)).astype(np.float32)
    flipped = nchw.copy()
    flipped[0, :, 0, 0] = flipped[0, ::-1, 0, 0] + np.array([0, 0, 5], np.float32)
    (m,) = compare(_outputs(flipped), _outputs(nchw), "segmentation")
    assert m.agreement == pytest.approx(15 / 16)


def test_integer_outputs_are_compared_for_equality():
    ref = Outputs(("idx",), [(np.array([1, 2, 3]),)])
    got = Outputs(("idx",), [(np.array([1, 2, 4]),)])
    (m,) = compare(got, ref, "generic")
    assert m.exact and m.agreement == pytest.approx(2 / 3)


def test_padding_positions_of_a_transformer_are_left_out():
    mask = np.array([[1, 1, 0]])
    ref = _outputs(np.array([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]]))
    got = _outputs(np.array([[[1.0, 0.0], [0.0, 1.0], [-5.0, 5.0]]]))
    (m,) = compare(got, ref, "embedding", attention_masks([{"attention_mask": mask}]))
    assert m.cosine == pytest.approx(1.0) and m.max_abs_diff == 0.0


def test_mismatched_output_shapes_fail_that_output_only():
    ref = Outputs(("a", "b"), [(np.zeros((1, 3)), np.ones((1, 2)))])
    got = Outputs(("a", "b"), [(np.zeros((1, 4)), np.ones((1, 2)))])
    a, b = compare(got, ref, "generic")
    assert not a.shape_ok and b.shape_ok and b.cosine == 1.0


def _info(name, dtype, shape):
    return TensorInfo(name, dtype, shape)


@pytest.mark.parametrize("inputs, outputs, labels, task", [
    ([_info("x", "float32", (None, 3, 224, 224))], [_info("p", "float32", (None, 1000))],
     None, "classification"),
    ([_info("ids", "int64", (None, None))] * 2, [_info("h", "float32", (None, None, 384))],
     None, "embedding"),
    ([_info("x", "float32", (None, 3, 64, 64))], [_info("m", "float32", (None, 4, 64, 64))],
     None, "segmentation"),
    ([_info("x", "float32", (None, 3, None, None))], [_info("o", "float32", (None, 84, None))],
     None, "detection"),
    ([_info("x", "float32", (None, 3, 32, None))], [_info("o", "float32", (None, None, 96))],
     None, "sequence"),
    ([_info("x", "float32", (None, 4))], [_info("y", "float32", (None, 3))],
     np.array([0, 1]), "classification"),
    ([_info("x", "float32", (None, 4))], [_info("y", "float32", (None, 3))], None, "generic"),
])
def test_task_is_inferred_from_the_signature(inputs, outputs, labels, task):
    assert infer_task(inputs, outputs, labels) == task


def test_top1_accuracy_and_latency_percentiles():
    outputs = Outputs(("p",), [(np.eye(4, dtype=np.float32)[i:i + 1],) for i in range(4)])
    assert top1_accuracy(outputs, np.array([0, 1, 2, 0])) == 0.75
    p50, p99 = latency_percentiles([0.001] * 99 + [0.1])
    assert p50 == pytest.approx(1.0) and p99 > 1.0


def test_calibration_reader_feeds_every_sample_once_by_name_then_none():
    samples = Samples({"x": np.arange(10, dtype=np.float32).reshape(5, 1, 2),
                       "sr": np.full(5, 16000, np.int64)})
    reader = SamplesCalibrationReader(samples)
    feeds = list(iter(reader.get_next, None))
    assert len(feeds) == 5 and feeds[4]["x"].shape == (1, 2)
    assert feeds[0]["sr"].shape == () and feeds[0]["sr"].dtype == np.int64
    reader.rewind()
    assert reader.get_next() is not None


def test_unknown_calibration_method_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        QuantizeSettings(calibration_method="magic")
    assert err.value.key == "calibration_method"
