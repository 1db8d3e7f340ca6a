"""`edgeship convert llm`: variants with a KV cache, held-out gates in the manifest, the
accuracy-aware fallback, variant files that carry their tokenizer, deltas of int4 files."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from edgeship.agent.delta import apply_delta
from edgeship.agent.errors import BundleError
from edgeship.agent.llm import assets
from edgeship.converter.bundle import sha256_file
from edgeship.converter.llm import export
from edgeship.converter.llm.evaluate import LmGate, LogitsRunner, Reference, compare, windows
from edgeship.converter.llm.fallback import mixed, quantize_with_fallback
from edgeship.converter.llm.pipeline import _tokenize, read_heldout
from edgeship.fleet.delta import make_delta


def test_every_variant_is_gated_on_heldout_text_and_says_so_in_the_manifest(tiny_lm):
    m = tiny_lm.manifest
    assert m.task == "text-generation" and m.llm is not None
    assert m.llm.context_length == 128 and m.llm.vocab_size == 512 and m.llm.chat_template
    assert {v.id for v in m.variants} == {"onnx-fp32", "onnx-fp16", "onnx-int8", "onnx-int4"}
    for v in m.variants:
        assert v.runtime == "onnxruntime-genai"
        for key in ("perplexity", "ppl_increase", "top1_agreement", "mean_kl", "memory_mb",
                    "weights_mb"):
            assert key in v.metrics, (v.id, key)
        assert v.metrics["ppl_increase"] <= 0.05 and v.metrics["top1_agreement"] >= 0.8
    sizes = {v.id: v.size for v in m.variants}
    assert sizes["onnx-int4"] < sizes["onnx-int8"] < sizes["onnx-fp32"]
    assert sizes["onnx-fp16"] < 0.7 * sizes["onnx-fp32"]
    assert m.variant("onnx-fp32").metrics["ppl_increase"] == pytest.approx(0, abs=1e-6)
    # the exported graph was checked against the PyTorch model before anything was signed
    assert tiny_lm.result.export_check["max_abs_diff"] < 1e-3


def test_variant_file_carries_tokenizer_and_genai_config(tiny_lm, tmp_path):
    path = tiny_lm.bundle / tiny_lm.manifest.variant("onnx-int4").file
    meta = assets.read_metadata(path)
    expected = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta == expected
    folder = assets.materialize(path, tmp_path / "genai")
    assert json.loads((folder / "genai_config.json").read_text())["model"]["decoder"][
        "filename"] == "model.onnx"
    assert (folder / "model.onnx").resolve() == path.resolve()
    assert (folder / "tokenizer.json").read_text() == (
        tiny_lm.checkpoint / "tokenizer.json").read_text()


def test_onnx_file_without_tokenizer_is_refused(tmp_path):
    from tests.support.models import good  # a plain ONNX classifier

    path = tmp_path / "plain.onnx"
    onnx.save(good(1), str(path))
    with pytest.raises(BundleError, match="carries no tokenizer"):
        assets.llm_assets(path)


@pytest.fixture(scope="module")
def fp32_and_reference(tiny_lm):
    fp32 = onnx.load(str(tiny_lm.bundle / tiny_lm.manifest.variant("onnx-fp32").file))
    head = tiny_lm.manifest.llm.head_dim
    ids = _tokenize(tiny_lm.checkpoint, read_heldout(tiny_lm.checkpoint, None))
    ref = Reference.measure(LogitsRunner(fp32, head), windows(ids, 64, 4), head)
    return fp32, ref


def test_fallback_keeps_the_most_harmful_layers_at_int8_until_the_gate_passes(
        fp32_and_reference):
    fp32, ref = fp32_and_reference
    spec = export.QuantSpec(bits=4, block_size=16)

    def evaluate(model):
        return compare(LogitsRunner(model, ref.head_dim), ref)

    plain = evaluate(mixed(fp32, spec, []))
    # a gate the all-int4 model misses but a partly-int8 one can meet
    strict = LmGate(max_ppl_increase=1.0, min_top1_agreement=0.0,
                    max_mean_kl=plain["mean_kl"] * 0.5)
    result = quantize_with_fallback(fp32, spec, evaluate, strict.check)
    assert result.kept, "the fallback kept nothing at higher precision"
    assert not result.failures and result.metrics["mean_kl"] <= strict.max_mean_kl
    assert set(result.harm) >= {"layer.0", "layer.1", "lm_head", "embed_tokens"}
    worst = max(result.harm, key=result.harm.get)
    assert result.kept[0] == worst
    ops = {n.op_type for n in result.model.graph.node}
    bits = {a.i for n in result.model.graph.node if n.op_type == "MatMulNBits"
            for a in n.attribute if a.name == "bits"}
    assert "MatMulNBits" in ops and bits >= {4} and (bits >= {8} or worst == "embed_tokens")


def test_fallback_reports_failure_when_no_mix_meets_the_gate(fp32_and_reference):
    fp32, ref = fp32_and_reference
    impossible = LmGate(max_ppl_increase=-1.0)
    result = quantize_with_fallback(
        fp32, export.QuantSpec(bits=4), lambda m: compare(LogitsRunner(m, ref.head_dim), ref),
        impossible.check)
    assert result.failures and "perplexity" in result.failures[0]


def test_finetuned_int4_ships_as_a_delta_of_the_changed_tensors(tiny_lm, tmp_path):
    v1 = tiny_lm.bundle / tiny_lm.manifest.variant("onnx-int4").file
    fp32 = onnx.load(str(tiny_lm.bundle / tiny_lm.manifest.variant("onnx-fp32").file))
    embedded = {k[len(assets.PREFIX):]: v for k, v in assets.read_metadata(v1).items()}
    # "fine-tune" one MLP projection of the last layer, then quantize as the converter does
    for init in fp32.graph.initializer:
        if "layers.1.mlp.down_proj" in init.name:
            w = onnx.numpy_helper.to_array(init)
            init.CopyFrom(onnx.numpy_helper.from_array(
                (w * 1.1 + 0.01).astype(np.float32), init.name))
    spec = export.QuantSpec(bits=4)
    v2 = export.save_single(mixed(fp32, spec, []), tmp_path / "v2.onnx", embedded)
    delta = make_delta(v1, v2)
    assert len(delta) < 0.25 * v2.stat().st_size, (len(delta), v2.stat().st_size)
    (tmp_path / "d").write_bytes(delta)
    apply_delta(tmp_path / "d", v1, tmp_path / "rebuilt.onnx", max_bytes=1 << 30)
    assert sha256_file(tmp_path / "rebuilt.onnx") == sha256_file(v2)


@pytest.mark.parametrize("algorithm", ["hqq", "k_quant"])
def test_int4_with_hqq_or_k_quant_quantizes_every_weight_and_passes_the_gate(
        fp32_and_reference, algorithm):
    fp32, ref = fp32_and_reference
    model = mixed(fp32, export.QuantSpec(bits=4, algorithm=algorithm), [])
    ops = {n.op_type for n in model.graph.node}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops and "MatMul" not in ops
    metrics = compare(LogitsRunner(model, ref.head_dim), ref)
    assert not LmGate(min_top1_agreement=0.8).check(metrics), metrics
