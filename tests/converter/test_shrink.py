"""Pruning and distillation on the trained digits CNN, then through the converter."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgeship.converter.digits import calibration_images
from edgeship.converter.export import export_onnx
from edgeship.converter.gates import Gate
from edgeship.converter.pipeline import ConvertSettings, convert
from edgeship.converter.shrink import (TrainSpec, count_parameters, distill, prune_channels,
                              prune_unstructured, sparsity, top1)


def test_unstructured_pruning_hits_the_target_and_compresses(trained, tmp_path):
    from edgeship.converter.compression import zstd_size

    pruned = prune_unstructured(trained.model, 0.7)
    assert abs(sparsity(pruned) - 0.7) < 0.01 and sparsity(trained.model) < 0.01
    d = trained.data
    assert top1(pruned, d.x_test, d.y_test) >= trained.test_accuracy - 0.05
    dense = export_onnx(trained.model, d.x_train[:1], tmp_path / "dense.onnx")
    sparse = export_onnx(pruned, d.x_train[:1], tmp_path / "sparse.onnx")
    assert zstd_size(sparse) < 0.6 * zstd_size(dense)


def test_channel_pruning_removes_channels_and_fine_tune_recovers(trained):
    d = trained.data
    pruned = prune_channels(trained.model, d.x_train[:1], 0.5, d.x_train, d.y_train,
                            TrainSpec(epochs=3))
    assert count_parameters(pruned) < 0.4 * count_parameters(trained.model)
    assert pruned.features[0].out_channels == 8  # 16 → 8: really removed
    out = pruned(torch.from_numpy(d.x_test[:2]))
    assert out.shape == (2, 10)
    assert top1(pruned, d.x_test, d.y_test) >= trained.test_accuracy - 0.03


def test_distilled_student_is_gated_against_the_teacher(trained, tmp_path):
    d = trained.data
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    student = distill(trained.model, student, d.x_train, d.y_train,
                      TrainSpec(epochs=15, learning_rate=3e-3))
    acc = top1(student, d.x_test, d.y_test)
    assert acc >= trained.test_accuracy - 0.04
    result = convert(student, d.x_train[:1], calibration_images(d), d.x_test, d.y_test,
                     tmp_path / "b", "student", 1,
                     Gate(max_accuracy_drop_points=5.0, min_agreement=0.9, min_cosine=0.5),
                     settings=ConvertSettings(
                         variants=("onnx-fp32",)), reference_model=trained.model)
    assert result.reference_accuracy == np.float64(trained.test_accuracy)
    fp32 = result.reports[0].metrics
    assert abs(fp32.accuracy - acc) < 1e-9
    assert abs(fp32.accuracy_drop - (trained.test_accuracy - acc) * 100) < 1e-6


def test_cli_channel_pruning_and_student_report_against_the_source(tmp_path, capsys):
    import argparse
    import json

    from edgeship.converter import cli

    parser = argparse.ArgumentParser(prog="edgeship")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([
        "convert", "digits", "--epochs", "8", "--prune-channels", "0.5",
        "--finetune-epochs", "3", "--variants", "onnx-fp32,onnx-int8",
        "--out", str(tmp_path), "--json", "--max-drop", "3", "--min-agreement", "0.9",
        "--min-cosine", "0.8"])
    assert args.func(args) == 0
    res = json.loads(capsys.readouterr().out)
    fp32 = next(v for v in res["variants"] if v["id"] == "onnx-fp32")["metrics"]
    assert 0 < fp32["agreement"] < 1.0  # measured against the unpruned source model
    assert res["reference_accuracy"] > 0.9
    assert fp32["size_bytes"] < 0.45 * 166_000  # half the channels: well under half size
