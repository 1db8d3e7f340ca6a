"""``edgeship convert onnx|torch``: every input form, and bad input → one line, exit 2,
nothing left behind."""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from edgeship.converter import cli
from edgeship.converter.bundle import read_bundle_dir
from edgeship.converter.export import export_onnx

from tests.converter.models_for_tests import tiny_cnn

FACTORY = "tests.converter.models_for_tests:tiny_cnn"


def _run(argv, capsys):
    parser = argparse.ArgumentParser(prog="edgeship")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert", *argv])
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def data_files(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    d = trained.data
    np.savez(root / "calib.npz", x=d.x_train[:64])
    np.savez(root / "val.npz", x=d.x_test[:120], y=d.y_test[:120])
    np.save(root / "val_nolabels.npy", d.x_test[:120])
    return root


@pytest.fixture(scope="module")
def digits_onnx_external(trained, tmp_path_factory):
    """The trained digits CNN as an ONNX file whose weights live in external data."""
    root = tmp_path_factory.mktemp("onnx")
    path = export_onnx(trained.model, trained.data.x_train[:1], root / "tmp.onnx")
    model = onnx.load(str(path))
    onnx.save_model(model, str(root / "digits.onnx"), save_as_external_data=True,
                    location="digits.onnx.data", size_threshold=0)
    return root / "digits.onnx"


def test_onnx_with_external_data_all_onnx_variants(digits_onnx_external, data_files,
                                                   tmp_path, capsys):
    assert (digits_onnx_external.parent / "digits.onnx.data").stat().st_size > 100_000
    code, out, _ = _run([
        "onnx", str(digits_onnx_external), "--calib", str(data_files / "calib.npz"),
        "--val", str(data_files / "val.npz"), "--out", str(tmp_path), "--json",
        "--device", "rpi4"], capsys)
    assert code == 0, out
    res = json.loads(out)
    assert res["device"] == "rpi4" and res["threads"] == 4
    assert set(res["skipped"]) == {"tflite-int8", "tflite-int8-dynamic", "tflite-fp32"}
    manifest = read_bundle_dir(res["bundle_dir"])
    assert {v.id for v in manifest.variants} == {"onnx-int8", "onnx-int8-dynamic",
                                                  "onnx-fp32"}
    for v in manifest.variants:
        assert 0 < v.metrics["zstd_size_bytes"] < v.size
        assert v.metrics["accuracy_drop"] <= 1.0
    assert res["tar_zst_bytes"] < res["tar_bytes"]
    report = tmp_path / "digits-v1.report"
    assert (report / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "onnx-int8-dynamic" in (report / "report.md").read_text()
    rows = json.loads((report / "report.json").read_text())["rows"]
    assert all(r["p99_ms"] >= r["p50_ms"] > 0 for r in rows)


def test_torch_factory_with_safetensors_weights_and_fp16_without_labels(
        data_files, tmp_path, capsys):
    from safetensors.torch import save_file

    model = tiny_cnn()
    with torch.no_grad():
        model.body[0].weight.mul_(3.0)  # weights differ from the factory's own
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    code, out, err = _run([
        "torch", FACTORY, "--weights", str(tmp_path / "w.safetensors"),
        "--input-shape", "1,1,8,8", "--calib", str(data_files / "calib.npz"),
        "--val", str(data_files / "val_nolabels.npy"), "--variants",
        "onnx-fp32,onnx-fp16", "--out", str(tmp_path / "o"), "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["reference_accuracy"] is None and res["model"] == "tiny_cnn"
    fp32 = next(v for v in res["variants"] if v["id"] == "onnx-fp32")["metrics"]
    assert fp32["agreement"] == 1.0 and fp32["max_abs_diff"] < 1e-4
    ref = model.eval()(torch.from_numpy(np.load(data_files / "val_nolabels.npy")[:4]))
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "o/tiny_cnn-v1/model.fp32.onnx"))
    got = sess.run(None, {"input": np.load(data_files / "val_nolabels.npy")[:4]})[0]
    np.testing.assert_allclose(got, ref.detach().numpy(), atol=1e-4)


def test_torchscript_and_pt2_inputs_with_a_data_callable_and_recipe(tmp_path, capsys):
    model = tiny_cnn().eval()
    example = torch.rand(1, 1, 8, 8)
    torch.jit.trace(model, example).save(str(tmp_path / "m.ts"))
    batch = torch.export.Dim("batch")  # a .pt2 needs a dynamic batch dimension
    program = torch.export.export(model, (torch.rand(2, 1, 8, 8),),
                                  dynamic_shapes=({0: batch},))
    torch.export.save(program, str(tmp_path / "m.pt2"))
    recipe = tmp_path / "r.toml"
    recipe.write_text('[data]\ncalib = "tests.converter.models_for_tests:random_batches"\n'
                      'val = "tests.converter.models_for_tests:digit_batches"\n'
                      '[gates]\nmax_accuracy_drop_points = 100.0\nmin_agreement = 0.0\n'
                      'min_cosine = 0.0\n')
    for name in ("m.ts", "m.pt2"):
        code, out, err = _run(["torch", str(tmp_path / name), "--recipe", str(recipe),
                               "--variants", "onnx-fp32", "--out", str(tmp_path / name[2:]),
                               "--json"], capsys)
        assert code == 0, err
        res = json.loads(out)
        assert res["shipped"] == ["onnx-fp32"] and res["variants"][0]["metrics"][
            "samples"] == 200


def test_image_folder_with_preprocessing(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(6):
            img = (rng.random((16, 16)) * 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / "imgs" / label / f"{i}.png")
    code, out, err = _run(["torch", FACTORY, "--calib", str(tmp_path / "imgs"),
                           "--resize", "8,8", "--grayscale", "--mean", "0.5", "--std",
                           "0.25", "--variants", "onnx-fp32", "--out", str(tmp_path / "o"),
                           "--min-agreement", "0", "--max-drop", "100", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["variants"][0]["metrics"]["samples"] == 12


# --- bad input: one line on stderr, exit 2, no output -----------------------------------

def _unsupported_op_model(path):
    node = helper.make_node("FrobnicateTensor", ["input"], ["logits"], domain="com.example")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                    [None, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 10])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("com.example", 1)])
    onnx.save_model(model, str(path))


def _bad_cases(tmp_path, data_files, good_onnx):
    (tmp_path / "junk.onnx").write_bytes(b"this is not a model\n" * 10)
    raw = good_onnx.read_bytes()
    (tmp_path / "trunc.onnx").write_bytes(raw[: len(raw) // 3])
    _unsupported_op_model(tmp_path / "custom.onnx")
    np.save(tmp_path / "wrong.npy", np.zeros((4, 3, 8, 8), np.float32))
    calib = ["--calib", str(data_files / "calib.npz")]
    return {
        "not a model": (["onnx", str(tmp_path / "junk.onnx"), *calib], "junk.onnx"),
        "truncated": (["onnx", str(tmp_path / "trunc.onnx"), *calib], "trunc.onnx"),
        "unsupported op": (["onnx", str(tmp_path / "custom.onnx"), *calib],
                           "FrobnicateTensor"),
        "shape mismatch onnx": (["onnx", str(good_onnx), "--calib",
                                 str(tmp_path / "wrong.npy")], "does not match"),
        "shape mismatch torch": (["torch", FACTORY, "--input-shape", "1,1,8,8",
                                  "--calib", str(tmp_path / "wrong.npy")],
                                 "does not match"),
        "missing calibration": (["onnx", str(good_onnx)], "missing calibration data"),
        "calibration file absent": (["onnx", str(good_onnx), "--calib",
                                     str(tmp_path / "nope.npz")], "no such file"),
        "unknown device": (["digits", "--device", "toaster9000"], "unknown device profile"),
        "tflite from onnx": (["onnx", str(good_onnx), *calib, "--variants",
                              "tflite-fp32"], "need the PyTorch source"),
        "not torchscript": (["torch", str(tmp_path / "junk.onnx"), *calib],
                            "not a TorchScript file"),
        "onnx directory": (["onnx", str(tmp_path), *calib], "is a directory"),
    }


@pytest.mark.parametrize("case", ["not a model", "truncated", "unsupported op",
                                  "shape mismatch onnx", "shape mismatch torch",
                                  "missing calibration", "calibration file absent",
                                  "unknown device", "tflite from onnx", "not torchscript",
                                  "onnx directory"])
def test_bad_input_is_one_line_exit_2_and_no_output(case, tmp_path, data_files,
                                                    digits_onnx_external, capsys):
    argv, expected = _bad_cases(tmp_path, data_files, digits_onnx_external)[case]
    out_dir = tmp_path / "out"
    code, out, err = _run([*argv, "--out", str(out_dir)], capsys)
    lines = err.strip().splitlines()
    assert code == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("edgeship: error:"), err
    assert expected in lines[0]
    assert not out_dir.exists() or list(out_dir.iterdir()) == []
