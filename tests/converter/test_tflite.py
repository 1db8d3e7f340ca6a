"""TFLite variants from PyTorch via litert-torch + ai-edge-quantizer, run with LiteRT.

Skipped cleanly where the ``tflite-convert`` extra is not installed."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_quantizer")
pytest.importorskip("ai_edge_litert")

from edgeship.agent.golden import load_golden  # noqa: E402
from edgeship.agent.manifest import GOLDEN_NAME  # noqa: E402
from edgeship.agent.runtime import load_runtime  # noqa: E402
from edgeship.converter.bundle import read_bundle_dir  # noqa: E402
from edgeship.converter.evaluate import TFLiteRunner  # noqa: E402
from edgeship.converter.pipeline import ConvertSettings, convert, convert_digits  # noqa: E402
from edgeship.converter.variants import TFLITE_VARIANTS  # noqa: E402
from tests.converter.models_for_tests import two_heads  # noqa: E402


def test_all_four_tflite_variants_pass_and_reproduce_their_golden_outputs(trained, tmp_path):
    result = convert_digits(tmp_path / "b", trained=trained,
                            settings=ConvertSettings(variants=("onnx-fp32", *TFLITE_VARIANTS)))
    assert set(result.shipped) == {"onnx-fp32", *TFLITE_VARIANTS}
    manifest = read_bundle_dir(result.bundle_dir)
    sizes = {v.id: v.size for v in manifest.variants}
    assert sizes["tflite-fp16"] < 0.6 * sizes["tflite-fp32"]
    assert sizes["tflite-int8"] < 0.35 * sizes["tflite-fp32"]
    for v in manifest.variants:
        if v.runtime != "litert":
            continue
        assert v.file.endswith(".tflite")
        golden = load_golden(result.bundle_dir / GOLDEN_NAME, v.id, manifest.inputs,
                             ["logits"])
        runner = TFLiteRunner(result.bundle_dir / v.file, threads=1)
        served = load_runtime("litert", result.bundle_dir / v.file)
        for k, feed in enumerate(golden.feeds):
            np.testing.assert_allclose(runner.run(feed)[0], golden.expected["logits"][k],
                                       atol=v.tolerance("logits"), rtol=0)
            # the agent's runtime, float32 in and out (tflite-int8 has int8 tensors inside)
            out = served.run(feed)[0]
            assert out.dtype == np.float32
            np.testing.assert_allclose(out, golden.expected["logits"][k],
                                       atol=v.tolerance("logits"), rtol=0)
        assert v.metrics["accuracy_drop"] <= 1.0
    fp32 = manifest.variant("tflite-fp32").metrics
    assert fp32["max_abs_diff"] < 1e-3 and fp32["agreement"] == 1.0
    for v in manifest.variants:  # onnxruntime has no armv7l build; TFLite runs there
        assert ("armv7l" in v.hardware) == (v.runtime == "litert"), v.id


def test_tflite_from_pytorch_keeps_every_output(trained, tmp_path):
    x = trained.data.x_test[:40]
    result = convert(two_heads(), x[:1], x, x, None, tmp_path / "b", "heads", 1,
                     settings=ConvertSettings(variants=("onnx-fp32", "tflite-fp32",
                                                        "tflite-int8-dynamic")))
    manifest = read_bundle_dir(result.bundle_dir)
    assert [o.name for o in manifest.outputs] == ["output_0", "output_1"]
    assert set(result.shipped) == {"onnx-fp32", "tflite-fp32", "tflite-int8-dynamic"}
    for r in result.reports:
        assert [o.name for o in r.metrics.outputs] == ["output_0", "output_1"]
    runtime = load_runtime("litert", result.bundle_dir / manifest.variant("tflite-fp32").file)
    boxes_and_classes = runtime.run({"input": x[:1]})
    assert [o.shape for o in boxes_and_classes] == [(1, 10), (1, 4)]  # the torch order


def test_a_32_bit_pi_gets_a_bundle_of_tflite_variants_only(trained, tmp_path):
    from edgeship.agent.selection import select_variant
    from edgeship.converter.options import plan

    chosen = plan(device="rpi3-32", variants=None, threads=None, gate_overrides={})
    assert chosen.variants and all(v.startswith("tflite-") for v in chosen.variants)
    result = convert_digits(tmp_path / "b", trained=trained,
                            settings=ConvertSettings(variants=("tflite-fp32",)))
    manifest = read_bundle_dir(result.bundle_dir)
    assert [v.id for v in manifest.variants] == ["tflite-fp32"]
    assert manifest.inputs[0].shape == (None, 1, 8, 8)  # from the fp32 ONNX export
    assert manifest.profile["signals"] and "estimate" in manifest.profile  # from LiteRT
    assert select_variant(manifest, ("int8-static", "fp32"), ("litert",), "armv7l").id == \
        "tflite-fp32"
