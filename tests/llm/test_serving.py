"""The agent's OpenAI-compatible endpoints, driven by the real `openai` client (and a raw
socket where a client must vanish mid-stream), on the tiny model's int4 variant."""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import openai
import pytest

from edgeship.agent.errors import HealthCheckError, Reason
from edgeship.agent.health import check_health
from edgeship.agent.llm.http import frontend
from edgeship.agent.llm.runtime import MAX_HELD_TOKENS, GenaiModel, SamplingParams
from edgeship.agent.llm.sse import ChunkEncoder
from edgeship.agent.metrics import AgentCollector, Metrics
from edgeship.agent.telemetry import build_batch
from tests.support import wait_until
from tests.support.llm import installed, serve_variant

PROMPT = "The for statement is used to"


@pytest.fixture(scope="module")
def api(tiny_lm):
    server, models = serve_variant(tiny_lm.bundle, "onnx-int4", max_active=1, max_queued=1,
                                   queue_timeout_s=0.5)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    yield {"server": server, "models": models, "client": client, "lm": tiny_lm}
    server.stop()


def test_completion_and_stream_agree_and_respect_max_tokens(api):
    c = api["client"]
    full = c.completions.create(model="tinylm", prompt=PROMPT, max_tokens=12, temperature=0)
    assert full.object == "text_completion" and full.usage.completion_tokens <= 12
    assert full.usage.prompt_tokens > 0 and full.choices[0].finish_reason in ("length", "stop")
    chunks = list(c.completions.create(model="tinylm", prompt=PROMPT, max_tokens=12,
                                       temperature=0, stream=True))
    assert len(chunks) > 2 and chunks[-1].choices[0].finish_reason is not None
    assert "".join(ch.choices[0].text for ch in chunks) == full.choices[0].text


def test_seed_makes_sampling_repeatable(api):
    c = api["client"]

    def sample(seed):
        return c.completions.create(model="tinylm", prompt=PROMPT, max_tokens=20,
                                    temperature=1.0, top_p=0.95, seed=seed,
                                    extra_body={"top_k": 50}).choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(s) for s in (1, 2, 3)}) > 1


def test_stop_string_ends_the_text_before_it(api):
    c = api["client"]
    text = c.completions.create(model="tinylm", prompt=PROMPT, max_tokens=30,
                                temperature=0).choices[0].text
    stop = text.strip()[3:6] if len(text.strip()) > 6 else text[:2]
    assert stop and stop in text
    got = c.completions.create(model="tinylm", prompt=PROMPT, max_tokens=30, temperature=0,
                               stop=[stop])
    assert got.choices[0].text == text[:text.index(stop)]
    assert got.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tinylm", prompt=PROMPT, max_tokens=30, temperature=0, stop=stop, stream=True))
    assert streamed == got.choices[0].text


def test_chat_completions_use_the_chat_template(api):
    c = api["client"]
    msgs = [{"role": "user", "content": "What does the for statement do?"}]
    r = c.chat.completions.create(model="tinylm", messages=msgs, max_tokens=8)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    rendered = api["models"].get("tinylm").runtime.render_chat(msgs)
    assert rendered.endswith("assistant:") and "user: What does" in rendered
    chunks = list(c.chat.completions.create(model="tinylm", messages=msgs, max_tokens=8,
                                            stream=True, temperature=0,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 8


def test_prompt_longer_than_the_context_is_refused_with_a_message(api):
    with pytest.raises(openai.BadRequestError) as e:
        api["client"].completions.create(model="tinylm", prompt="def " * 400, max_tokens=4)
    assert "context is 128 tokens" in str(e.value)
    assert e.value.body["code"] == "context_length_exceeded"


@pytest.mark.parametrize("kwargs, match", [
    ({"model": "nope", "prompt": "x"}, "no model named"),
    ({"model": "tinylm", "prompt": "x", "temperature": 5}, "temperature"),
    ({"model": "tinylm", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "tinylm", "prompt": "x", "n": 3}, "n=3"),
])
def test_bad_requests_get_a_4xx_naming_the_problem(api, kwargs, match):
    with pytest.raises((openai.BadRequestError, openai.NotFoundError), match=match):
        api["client"].completions.create(**kwargs)


def test_queue_bound_answers_429_and_a_long_wait_503(api):
    c = api["client"]
    admission = frontend(api["models"]).admission
    with admission.enter():  # a generation holds the only slot
        start = time.monotonic()
        with pytest.raises(openai.InternalServerError) as waited:  # queued, then gave up
            c.completions.create(model="tinylm", prompt=PROMPT, max_tokens=2)
        assert waited.value.status_code == 503 and time.monotonic() - start >= 0.5
        admission.waiting = admission.max_queued  # the queue is full
        try:
            with pytest.raises(openai.RateLimitError) as full:
                c.completions.create(model="tinylm", prompt=PROMPT, max_tokens=2)
        finally:
            admission.waiting = 0
        assert "try again later" in str(full.value)
    assert c.completions.create(model="tinylm", prompt=PROMPT, max_tokens=2).usage


def test_client_disconnect_stops_generation_and_frees_the_kv_cache(api, monkeypatch):
    runtime: GenaiModel = api["models"].get("tinylm").runtime
    real = runtime.generate

    def slow(*args, **kwargs):  # a device-speed model: 20 ms per token
        for step in real(*args, **kwargs):
            time.sleep(0.02)
            yield step

    monkeypatch.setattr(runtime, "generate", slow)
    stats = frontend(api["models"]).stats_for("tinylm")
    cancelled = stats.cancelled
    body = json.dumps({"model": "tinylm", "prompt": PROMPT, "max_tokens": 100,
                       "temperature": 0, "stream": True}).encode()
    host, port = api["server"].server_address[:2]
    with socket.create_connection((host, port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                  b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        got = b""
        while got.count(b"data: ") < 2:
            got += s.recv(4096)
        assert runtime.active_sequences == 1
    wait_until(lambda: stats.cancelled == cancelled + 1, timeout_s=5)
    assert runtime.active_sequences == 0
    tokens = sum(stats.tokens_by_version.values())
    time.sleep(0.2)
    assert sum(stats.tokens_by_version.values()) == tokens  # nothing generated any more


def _reference(c, tokens: int):
    return c.completions.create(model="tinylm", prompt=PROMPT, max_tokens=tokens,
                                temperature=0, extra_body={"ignore_eos": True})


def test_a_slow_reader_gets_every_token_in_order_and_the_completions_text(api):
    full = _reference(api["client"], 60)
    body = json.dumps({"model": "tinylm", "prompt": PROMPT, "max_tokens": 60,
                       "temperature": 0, "stream": True, "ignore_eos": True,
                       "stream_options": {"include_usage": True}}).encode()
    got = b""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # the server's writes block
        s.connect(api["server"].server_address[:2])
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                  b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        while data := s.recv(256):
            got += data
            time.sleep(0.002)
    stream = got.partition(b"\r\n\r\n")[2]
    events = [json.loads(e[6:]) for e in stream.split(b"\n\n") if e.startswith(b"data: {")]
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) \
        == full.choices[0].text
    assert events[-1]["usage"]["completion_tokens"] == full.usage.completion_tokens == 60
    assert stream.endswith(b"data: [DONE]\n\n")


def test_slow_writes_send_the_tokens_meanwhile_as_one_chunk_with_the_same_text(api,
                                                                              monkeypatch):
    full = _reference(api["client"], 60)
    real = ChunkEncoder.text

    def slow(self, s):  # a write that costs 3 ms (a lagging reader), encoding included
        time.sleep(0.003)
        return real(self, s)

    monkeypatch.setattr(ChunkEncoder, "text", slow)
    chunks = list(api["client"].completions.create(
        model="tinylm", prompt=PROMPT, max_tokens=60, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    texts = [ch.choices[0].text for ch in chunks if ch.choices and ch.choices[0].text]
    assert "".join(texts) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == 60 and len(texts) < 30


def test_generation_holds_tokens_until_the_pace_allows_and_loses_none(api):
    runtime: GenaiModel = api["models"].get("tinylm").runtime
    ids = runtime.encode(PROMPT)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)

    class Later:
        next_at = float("inf")

    each = list(runtime.generate(ids, params))
    held = list(runtime.generate(ids, params, pace=Later()))
    assert [len(batch) for batch in each] == [1] * 20
    assert [len(batch) for batch in held] == [MAX_HELD_TOKENS, 20 - MAX_HELD_TOKENS]
    assert sum(held, []) == sum(each, [])


def test_a_stop_string_inside_coalesced_tokens_counts_only_the_tokens_up_to_it(api,
                                                                              monkeypatch):
    c = api["client"]
    kw = dict(model="tinylm", prompt=PROMPT, max_tokens=60, temperature=1.0, seed=3,
              extra_body={"ignore_eos": True, "top_k": 50})
    text = c.completions.create(**kw).choices[0].text
    stop = next((text[i:i + 2] for i in range(len(text) // 2, len(text) - 2)
                 if text.index(text[i:i + 2]) == i), None)  # first seen in the later half
    assert stop, f"no stop string first seen in the later half of {text!r}"
    want = c.completions.create(**kw, stop=[stop])
    real = ChunkEncoder.text
    monkeypatch.setattr(ChunkEncoder, "text", lambda self, s: time.sleep(0.003) or real(self, s))
    chunks = list(c.completions.create(**kw, stop=[stop], stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want.choices[0].text
    assert chunks[-1].usage.completion_tokens == want.usage.completion_tokens < 60
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"


def test_health_check_compares_golden_top_k_and_catches_a_wrong_model(api, tmp_path):
    lm = api["lm"]
    inst = installed(lm.bundle, "onnx-int4")
    runtime = api["models"].get("tinylm").runtime
    report = check_health(runtime, inst.manifest, inst.variant, inst.golden_path)
    assert report.max_abs_diff <= inst.variant.golden_atol
    with np.load(inst.golden_path) as g:
        arrays = dict(g)
    arrays["onnx-int4"] = arrays["onnx-int4"][:, ::-1].copy()  # another model's next tokens
    np.savez(tmp_path / "golden.npz", **arrays)
    with pytest.raises(HealthCheckError) as e:
        check_health(runtime, inst.manifest, inst.variant, tmp_path / "golden.npz")
    assert e.value.reason_code == Reason.TOKEN_MISMATCH


def test_telemetry_and_prometheus_carry_generation_numbers(api):
    c = api["client"]
    for _ in range(3):
        c.completions.create(model="tinylm", prompt=PROMPT, max_tokens=10, temperature=0)
    text = Metrics(AgentCollector(api["models"], None, lambda: {}, {"id": "t"})).text()
    for name in ("edgeship_llm_generated_tokens_total", "edgeship_llm_ttft_ms",
                 "edgeship_llm_decode_tokens_per_s", "edgeship_llm_prefill_tokens_per_s"):
        assert name.encode() in text, name
    batch = build_batch("dev-1", api["models"], {}, {})
    llm = batch["models"]["tinylm"]["llm"]
    assert llm["completions"] >= 3 and llm["decode_tokens_per_s"] > 0
    assert llm["ttft_ms"]["p50"] > 0 and int(llm["generated_tokens_total"]["1"]) > 0
    # the ordinary latency window is milliseconds per decoded token: the fleet's latency
    # gate (new p50 / old p50) halts a release whose decode rate dropped
    p50 = batch["models"]["tinylm"]["latency_ms"]["p50"]
    assert p50 == pytest.approx(1000 / llm["decode_tokens_per_s"], rel=0.5)


def test_shadow_compares_the_candidates_next_token_on_live_prompts(api):
    from edgeship.agent.manifest import ShadowPolicy
    from edgeship.agent.runtime import load_runtime
    from edgeship.agent.serving import LoadedModel
    from edgeship.agent.shadow import ShadowRun

    cand = installed(api["lm"].bundle, "onnx-int8")
    run = ShadowRun(LoadedModel(cand, load_runtime(cand.variant.runtime, cand.model_path)),
                    ShadowPolicy(min_agreement=0.5, samples=4))
    api["models"].shadows["tinylm"] = run
    try:
        for i in range(4):
            api["client"].completions.create(model="tinylm", prompt=f"{PROMPT} {i}",
                                             max_tokens=3, temperature=1.0, seed=i)
        wait_until(lambda: run.compared >= 4, timeout_s=10)
    finally:
        del api["models"].shadows["tinylm"]
        run.close()
    summary = run.summary()
    assert summary["compared"] == 4 and summary["errors"] == 0
    assert summary["agreement"] >= 0.75  # int8 and int4 of one model pick the same token


def test_install_health_check_runs_the_language_model_in_the_limited_child(api, tmp_path):
    import shutil

    from edgeship.agent.health import HealthLimits, check_in_subprocess
    from edgeship.agent.store import ModelStore

    lm, store = api["lm"], ModelStore(tmp_path / "models")
    staging = store.staging_dir("tinylm", 1)
    variant = lm.manifest.variant("onnx-int4")
    for name in ("manifest.json", "golden.npz", variant.file):
        shutil.copy(lm.bundle / name, staging / name)
    bundle = store.finalize("tinylm", 1, staging, lm.manifest, variant).directory
    report = check_in_subprocess(bundle, "onnx-int4", HealthLimits(max_memory_mb=96,
                                                                  timeout_s=120))
    assert report.samples == 1 and report.max_abs_diff <= 0.05
    with np.load(bundle / "golden.npz") as g:
        arrays = dict(g)
    arrays["onnx-int4"] = arrays["onnx-int4"][:, ::-1].copy()
    np.savez(bundle / "golden.npz", **arrays)
    with pytest.raises(HealthCheckError) as e:
        check_in_subprocess(bundle, "onnx-int4", HealthLimits(max_memory_mb=96, timeout_s=120))
    assert e.value.reason_code in (Reason.TOKEN_MISMATCH, Reason.BUNDLE_INVALID)


def test_a_failing_runtime_is_a_500_and_the_server_keeps_serving(api, monkeypatch):
    runtime = api["models"].get("tinylm").runtime

    def broken(*args, **kwargs):
        raise RuntimeError("onnxruntime-genai: out of memory")
        yield  # a generator, like the real one

    monkeypatch.setattr(runtime, "generate", broken)
    with pytest.raises(openai.InternalServerError, match="generation failed"):
        api["client"].completions.create(model="tinylm", prompt=PROMPT, max_tokens=2)
    monkeypatch.undo()
    assert api["client"].completions.create(model="tinylm", prompt=PROMPT,
                                            max_tokens=2).usage.completion_tokens >= 1
