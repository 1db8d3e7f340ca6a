"""Accuracy-aware INT8: a model plain static INT8 breaks, and the fallback repairs.

The digits CNN is rescaled so four hidden units of the first linear layer carry values
1000× larger (and the next layer divides them back): the float function is unchanged, but
per-tensor activation quantization of that layer's output crushes the other 60 units to
zero — real-world outlier channels, as in transformers' LayerNorm outputs.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from edgeship.converter.accuracy_aware import (FallbackSettings, nodes_touching, quantize_with_fallback,
                                      rank_tensors, relative_error)
from edgeship.converter.digits import calibration_images
from edgeship.converter.evaluate import OnnxRunner
from edgeship.converter.export import export_onnx
from edgeship.converter.gates import Gate
from edgeship.converter.pipeline import ConvertSettings
from edgeship.converter.samples import Samples


def _logits(path, x):
    return OnnxRunner(path).run({"input": x})[0]


def test_relative_error_counts_crushed_small_values_not_just_energy():
    ref = np.array([1000.0, 1.0, 2.0, 3.0, 0.0])
    crushed = np.array([1000.0, 0.0, 0.0, 0.0, 0.0])
    assert relative_error(ref, crushed) == pytest.approx(0.75)
    assert relative_error(ref, ref) == 0.0
    assert relative_error(ref, ref * 1.01) == pytest.approx(0.01)


def test_rank_and_exclusion_helpers():
    assert rank_tensors({"a": 0.1, "b": 0.9, "c": 0.5}, skip=["b"]) == ["c", "a"]
    nodes = [("n1", ("x",), ("t",)), ("n2", ("t",), ("u",)), ("n3", ("t", "u"), ("y",))]
    assert nodes_touching("t", nodes) == ["n1", "n2", "n3"]


@pytest.fixture(scope="module")
def outlier_model(trained):
    model = copy.deepcopy(trained.model)
    with torch.no_grad():
        fc1, fc2 = model.classifier[1], model.classifier[3]
        fc1.weight[:4] *= 1000.0
        fc1.bias[:4] *= 1000.0
        fc2.weight[:, :4] /= 1000.0
    return model


def _drop_gate(data, reference):
    ref_acc = (reference.argmax(1) == data.y_test).mean()

    def gate(path):
        acc = (_logits(path, data.x_test).argmax(1) == data.y_test).mean()
        drop = (ref_acc - acc) * 100
        return [] if drop <= 1.0 else [f"accuracy drop {drop:.1f} pt"]
    return gate


def test_fallback_keeps_only_the_outlier_layers_in_float(outlier_model, trained, tmp_path):
    data = trained.data
    fp32 = export_onnx(outlier_model, data.x_train[:1], tmp_path / "fp32.onnx")
    reference = _logits(fp32, data.x_test)
    gate = _drop_gate(data, reference)
    calib = Samples.from_rows("input", calibration_images(data))

    plain = quantize_with_fallback(fp32, tmp_path / "plain.onnx", calib, gate,
                                   fallback=FallbackSettings(max_rounds=1))
    assert not plain.passed and "accuracy drop" in plain.history[0]["failures"][0]

    fixed = quantize_with_fallback(fp32, tmp_path / "int8.onnx", calib, gate)
    assert fixed.passed and fixed.rounds >= 2 and fixed.excluded
    assert not gate(fixed.path)
    import onnx

    graph = onnx.load(str(fixed.path)).graph
    quantized_convs = [n for n in graph.node if n.op_type == "Conv"
                       and any(i.endswith("DequantizeLinear_Output") for i in n.input)]
    assert len(quantized_convs) == 2, "the convolutions must stay INT8"
    assert not any("conv" in name for name in fixed.excluded)


def test_pipeline_ships_the_repaired_int8_and_records_what_stayed_float(outlier_model,
                                                                        trained, tmp_path):
    data = trained.data
    from edgeship.converter.pipeline import convert

    result = convert(outlier_model, data.x_train[:1], calibration_images(data), data.x_test,
                     data.y_test, tmp_path / "b", "outlier", 1, Gate(),
                     settings=ConvertSettings(variants=("onnx-fp32", "onnx-int8")))
    int8 = next(r for r in result.reports if r.id == "onnx-int8")
    assert int8.passed and int8.notes["nodes_in_float"] and int8.notes["int8_rounds"] >= 2
    assert "onnx-int8" in result.shipped
    assert result.manifest.variant("onnx-int8").metrics["accuracy_drop"] <= 1.0


def test_without_fallback_the_broken_int8_is_not_shipped(outlier_model, trained, tmp_path):
    data = trained.data
    from edgeship.converter.pipeline import convert

    settings = ConvertSettings(variants=("onnx-fp32", "onnx-int8"),
                               fallback=FallbackSettings(enabled=False))
    result = convert(outlier_model, data.x_train[:1], calibration_images(data), data.x_test,
                     data.y_test, tmp_path / "b", "outlier", 1, Gate(), settings=settings)
    assert result.shipped == ("onnx-fp32",)
