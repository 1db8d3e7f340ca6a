"""The converter on graphs users bring (small ones, built here): no data, pinned shapes,
one variant failing without sinking the others, Constant-node weights, a golden file that
stays small for large inputs, torch sources with non-tensor arguments, one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from edgeship.agent.golden import budget_bytes, load_golden
from edgeship.agent.manifest import GOLDEN_NAME
from edgeship.converter.bundle import read_bundle_dir
from edgeship.converter.cli import one_line
from tests.support import zoo
from tests.zoo.conftest import run_convert

FACTORY = "tests.converter.models_for_tests:"


@pytest.fixture(scope="module")
def ocr(tmp_path_factory):
    return zoo.paddle_ocr_rec(tmp_path_factory.mktemp("ocr"))


def _variants(result: dict) -> dict[str, dict]:
    return {v["id"]: v for v in result["variants"]}


def test_no_data_makes_the_variants_that_need_none(ocr, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, result, err = run_convert(["onnx", str(ocr.path), "--device", "rpi4", "--out",
                                     str(tmp_path / "o"), "--no-tar"], capsys)
    assert code == 0, err
    v = _variants(result)
    assert v["onnx-int8"]["reasons"] == [{"gate": "error", "stage": "skipped", "error":
                                          "skipped: needs calibration data (--calib)"}]
    assert v["onnx-fp32"]["passed"] and v["onnx-int8-dynamic"]["passed"]
    assert result["accuracy_measured"] is False
    assert "accuracy not measured" in result["warnings"][0]
    report = (tmp_path / "o" / "ocr_rec-v1.report" / "report.md").read_text()
    assert "Accuracy was not measured" in report
    manifest = read_bundle_dir(result["bundle_dir"])
    golden = load_golden(Path(result["bundle_dir"]) / GOLDEN_NAME, "onnx-fp32",
                         manifest.inputs, ["softmax_0.tmp_0"])
    assert golden.feeds[0]["x"].shape == (1, 3, 32, 32)  # dynamic dims synthesized
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # nothing in the cwd


def test_input_shape_pins_a_dynamic_dim_by_name(ocr, tmp_path, capsys):
    code, result, err = run_convert(["onnx", str(ocr.path), "--input-shape",
                                     "x=1,3,32,48", "--variants", "onnx-fp32", "--out",
                                     str(tmp_path), "--no-tar"], capsys)
    assert code == 0, err
    assert read_bundle_dir(result["bundle_dir"]).inputs[0].shape == (1, 3, 32, 48)
    code, _, err = run_convert(["onnx", str(ocr.path), "--input-shape", "image=1,3,32,48",
                                "--out", str(tmp_path / "b")], capsys, as_json=False)
    assert code == 2 and "no input 'image'" in err and len(err.strip().splitlines()) == 1


def test_constant_node_weights_quantize_static_and_dynamic(ocr, tmp_path, capsys):
    assert any(n.op_type == "Constant" for n in onnx.load(str(ocr.path)).graph.node)
    code, result, err = run_convert(["onnx", str(ocr.path), "--calib", str(ocr.data),
                                     "--val", str(ocr.val), "--variants",
                                     "onnx-int8,onnx-int8-dynamic", "--out", str(tmp_path),
                                     "--no-tar"], capsys)
    assert code == 0, err
    v = _variants(result)
    assert result["task"] == "sequence" and result["reference_accuracy"] == 1.0  # per step
    assert v["onnx-int8"]["passed"] and v["onnx-int8-dynamic"]["passed"]
    assert v["onnx-int8"]["metrics"]["agreement"] >= 0.97
    assert v["onnx-int8-dynamic"]["metrics"]["size_bytes"] < 0.6 * ocr.path.stat().st_size


def test_one_variant_failing_never_sinks_the_others(ocr, tmp_path, capsys, monkeypatch):
    from edgeship.converter import pipeline

    def broken(src, dst):
        raise RuntimeError("fp16 tooling crashed\nwith a second line")

    monkeypatch.setattr(pipeline, "make_fp16", broken)
    code, result, err = run_convert(["onnx", str(ocr.path), "--calib", str(ocr.data),
                                     "--variants", "onnx-fp16,onnx-fp32", "--out",
                                     str(tmp_path), "--no-tar"], capsys)
    assert code == 0, err
    (reason,) = _variants(result)["onnx-fp16"]["reasons"]
    assert reason["stage"] == "make" and "fp16 tooling crashed" in reason["error"]
    assert "\n" not in reason["error"]
    assert result["shipped"] == ["onnx-fp32"]
    code, result, err = run_convert(["onnx", str(ocr.path), "--calib", str(ocr.data),
                                     "--variants", "onnx-fp16", "--out",
                                     str(tmp_path / "none"), "--no-tar"], capsys)
    assert code == 1 and not result["ok"]
    assert result["variants"][0]["reasons"][0]["stage"] == "make"
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").iterdir())


def _big_input_model(path: Path, side: int = 320) -> Path:
    import torch

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=4, padding=1),
                                torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4),
                                torch.nn.Flatten()).eval()
    torch.onnx.export(model, (torch.zeros(1, 3, side, side),), str(path), dynamo=False,
                      input_names=["image"], output_names=["features"],
                      dynamic_axes={"image": {0: "n"}, "features": {0: "n"}})
    return path


def test_golden_file_stays_within_its_budget_for_large_inputs(tmp_path, capsys):
    model = _big_input_model(tmp_path / "big.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", image=rng.random((4, 1, 3, 320, 320), np.float32))
    code, result, err = run_convert(["onnx", str(model), "--calib", str(tmp_path / "d.npz"),
                                     "--variants", "onnx-fp32,onnx-int8", "--out",
                                     str(tmp_path / "o"), "--no-tar"], capsys)
    assert code == 0, err
    manifest = read_bundle_dir(result["bundle_dir"])
    biggest = max(v.size for v in manifest.variants)
    assert manifest.golden_size <= budget_bytes(biggest)  # a 1.2 MB input did not fit
    golden_path = Path(result["bundle_dir"]) / GOLDEN_NAME
    with np.load(golden_path) as data:
        assert "pattern:image" in data.files and "in:image" not in data.files
    from edgeship.agent.health import check_health
    from edgeship.agent.runtime import load_runtime

    for v in manifest.variants:
        runtime = load_runtime("onnxruntime", Path(result["bundle_dir"]) / v.file, threads=1)
        assert check_health(runtime, manifest, v, golden_path).max_abs_diff <= v.tolerance(
            "features")


def test_torch_forward_with_a_non_tensor_argument(tmp_path, capsys):
    x = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    argv = ["torch", FACTORY + "with_sample_rate", "--calib", str(tmp_path / "x.npy"),
            "--variants", "onnx-fp32", "--no-tar"]
    code, _, err = run_convert([*argv, "--out", str(tmp_path / "a")], capsys, as_json=False)
    assert code == 2 and "--const-arg sr=VALUE" in err and len(err.strip().splitlines()) == 1
    code, result, err = run_convert([*argv, "--const-arg", "sr=8000", "--out",
                                     str(tmp_path / "b")], capsys)
    assert code == 0, err
    assert result["variants"][0]["metrics"]["max_abs_diff"] < 1e-4


def test_without_the_tflite_extra_device_skips_tflite_with_a_reason(tmp_path, capsys,
                                                                   monkeypatch):
    from edgeship.converter import tflite

    monkeypatch.setattr(tflite, "available", lambda: False)
    x = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    code, result, err = run_convert(["torch", FACTORY + "tiny_cnn", "--calib",
                                     str(tmp_path / "x.npy"), "--device", "rpi4", "--out",
                                     str(tmp_path / "o"), "--no-tar"], capsys)
    assert code == 0, err
    skipped = {v["id"]: v["reasons"][0]["error"] for v in result["variants"]
               if v["reasons"] and v["reasons"][0].get("stage") == "skipped"}
    assert set(skipped) == {"tflite-int8", "tflite-int8-dynamic", "tflite-fp32"}
    assert all("tflite-convert" in why for why in skipped.values())
    assert "onnx-int8" in result["shipped"]


def test_error_lines_carry_no_ansi_codes_or_line_breaks():
    assert one_line("\x1b[31mboom\x1b[0m\n  at line 2") == "boom at line 2"
