"""Pure parts: memory need and admission, variant choice, request parsing, stop strings,
the decode-rate halt through the rollout's latency gate."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edgeship.agent.errors import InferenceInputError, Reason
from edgeship.agent.llm.openai_api import StopFilter, parse_request
from edgeship.agent.llm.spec import (LlmSpec, MemoryBudgetError, check_fits, kv_cache_mb,
                                     memory_need_mb)
from edgeship.agent.manifest import Manifest, TensorSpec, Variant
from edgeship.agent.selection import select_variant

SPEC = LlmSpec(context_length=4096, vocab_size=32000, layers=32, kv_heads=8, head_dim=128)


def test_kv_cache_of_a_llama_3_8b_shape_at_full_context():
    # 2 (K,V) x 32 layers x 8 heads x 128 dims x 4096 tokens x 4 bytes = 1 GiB (fp32 cache)
    assert kv_cache_mb(SPEC) == 1024
    assert kv_cache_mb(replace(SPEC, kv_dtype_bytes=2)) == 512
    assert memory_need_mb(SPEC, 4000) == pytest.approx(4000 + 1024 + 4096 * 32000 * 4 / 2**20
                                                       + 64)


def test_a_model_that_does_not_fit_is_refused_with_a_reason_code():
    with pytest.raises(MemoryBudgetError) as e:
        check_fits("llama", SPEC, {"weights_mb": 4000}, 2048)
    assert e.value.reason_code == Reason.MEMORY_BUDGET_EXCEEDED
    assert e.value.need_mb > 4500 and "2048 MB" in str(e.value)
    assert check_fits("llama", SPEC, {"weights_mb": 400}, 2048) < 2048


def _manifest(weights: dict[str, float]) -> Manifest:
    variants = tuple(Variant(id=f"onnx-{p}", runtime="onnxruntime-genai", precision=p,
                             file=f"m.{p}.onnx", sha256="0" * 64, size=1,
                             metrics={"weights_mb": w}) for p, w in weights.items())
    return Manifest(model="lm", version=1, task="text-generation",
                    inputs=(TensorSpec("input_ids", "int64", (1, None)),),
                    outputs=(TensorSpec("logits", "float32", (1, 32000)),),
                    variants=variants, golden_file="golden.npz", golden_sha256="0" * 64,
                    golden_size=1, llm=SPEC)


def test_device_takes_the_smallest_precision_that_fits_or_refuses():
    m = Manifest.from_bytes(_manifest({"fp32": 4000, "int8": 600, "int4": 300}).to_bytes())
    assert m.llm == SPEC
    pick = select_variant(m, ["fp32"], ["onnxruntime-genai"], "aarch64", 2048)
    assert pick.precision == "int4"
    only_big = _manifest({"fp32": 4000, "int8": 1500})
    with pytest.raises(MemoryBudgetError):
        select_variant(only_big, ["fp32"], ["onnxruntime-genai"], "aarch64", 2048)
    assert select_variant(only_big, ["fp32"], ["onnxruntime-genai"], "aarch64",
                          8192).precision == "int8"


def test_request_fields_are_parsed_and_checked():
    req = parse_request({"model": "m", "prompt": ["hi"], "max_tokens": 5, "temperature": 0,
                         "top_p": 0.5, "top_k": 3, "stop": "\n", "seed": 4,
                         "stream": True}, chat=False)
    assert (req.prompt, req.params.max_tokens, req.params.top_k, req.params.stop,
            req.params.seed, req.stream) == ("hi", 5, 3, ("\n",), 4, True)
    assert req.params.greedy and not req.params.ignore_eos
    assert parse_request({"model": "m", "prompt": "x", "ignore_eos": True},
                         chat=False).params.ignore_eos
    for bad, match in [({"prompt": "x"}, "model"), ({"model": "m", "prompt": 3}, "prompt"),
                       ({"model": "m", "prompt": "x", "max_tokens": 1.5}, "integer"),
                       ({"model": "m", "prompt": "x", "stop": [1]}, "stop"),
                       ({"model": "m", "prompt": "x", "top_p": 0}, "top_p"),
                       ({"model": "m", "messages": []}, "messages")]:
        with pytest.raises(InferenceInputError, match=match):
            parse_request(bad, chat="messages" in bad)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # shared 2-core box
@given(st.lists(st.text(alphabet="ab\n", max_size=4), max_size=12),
       st.lists(st.text(alphabet="ab\n", min_size=1, max_size=3), min_size=1, max_size=2))
@example(pieces=["b\n", "b"], stops=["\n", "b\nb"])  # "\n" ends the text before "b\nb" can
def test_stop_filter_emits_exactly_the_text_before_the_first_stop(pieces, stops):
    filt = StopFilter(tuple(stops))
    out = ""
    for piece in pieces:
        out += filt.feed(piece)
        if filt.stopped:
            break
    if not filt.stopped:
        out += filt.flush()
    # generation stops after the piece that completes a stop string: the text is cut at the
    # earliest stop string present then (a longer one that would complete later never does)
    seen = ""
    for piece in pieces:
        seen += piece
        cuts = [seen.find(s) for s in stops if s in seen]
        if cuts:
            expected = seen[:min(cuts)]
            break
    else:
        expected = seen
    assert out == expected


def test_a_slower_decode_rate_halts_the_rollout_like_the_latency_gate():
    from edgeship.fleet.rollout import DeviceStats, Policy, WaveObservation, evaluate_wave

    # p50 of a language model is ms per decoded token: 25 tokens/s -> 40 ms, 10 -> 100 ms
    old = {"d1": DeviceStats(requests=50, p50_ms=40.0)}
    new = {"d1": DeviceStats(requests=50, p50_ms=100.0)}
    obs = WaveObservation(devices=("d1",), started_at=0.0, outcomes={"d1": ("serving", None)},
                          new_stats=new, baseline=old, installed_at=0.0)
    verdict = evaluate_wave(obs, Policy(soak_s=0), now=100.0)
    assert verdict.decision == "fail" and verdict.gate == "latency"


@pytest.mark.parametrize("argv, message", [
    (["convert", "llm", "/"], "no config.json"),
    (["convert", "llm", "no_such_module_xyz:make"], "cannot load factory"),
])
def test_convert_llm_refuses_bad_sources_with_one_line(argv, message, tmp_path, capsys):
    from edgeship.cli import main

    assert main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
