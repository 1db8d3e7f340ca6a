"""``scripts/bench-llm``: the language-model path on this CPU, with its peers in the same run.

1. ``edgeship convert llm`` on the checkpoint (default ``build/pydoc-lm``, trained by
   ``scripts/train-llm`` when missing): fp32 / fp16 / int8 / int4 with size, perplexity and
   its change, top-1 agreement and mean KL against fp32 on held-out text.
2. Peers from the same checkpoint: onnxruntime-genai's own builder at int4 (its defaults)
   and llama.cpp (llama-cpp-python) at Q4_K_M, measured the same way.
3. Speed, each in a fresh process: time to first token and decode tokens/s (greedy, bare
   generation loops), peak RSS; and peak RSS at the full context against the memory need the
   agent's admission check computes.
4. The agent's streaming endpoint (a separate process, read by a minimal SSE reader and by
   the ``openai`` client) against a bare onnxruntime-genai loop on the same int4 file,
   interleaved rounds. The client's decode rate is the tokens the server reports
   (``usage.completion_tokens``) over the time from the first to the last content chunk: a
   chunk may carry several tokens. ``--endpoint-only`` runs just this part on the int4
   variant already converted under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)
PROMPT_TOKENS = 32


def _run(kind: str, path: Path, ids: list[int], tokens: int, threads: int,
         rounds: int) -> dict:
    cmd = [sys.executable, "-m", "bench.llm_run", kind, str(path), "--prompt-ids",
           ",".join(map(str, ids)), "--tokens", str(tokens), "--threads", str(threads),
           "--rounds", str(rounds)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _checkpoint(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    from edgeship.converter.llm.tinylm import train

    logger.info("no checkpoint at %s: training it (scripts/train-llm)", path)
    train(path)
    return path


def convert(checkpoint: Path, out: Path):
    from edgeship.converter.llm.pipeline import LlmSettings, convert_llm

    return convert_llm(str(checkpoint), out / "bundle", "pydoc-lm", 1,
                       settings=LlmSettings(overwrite=True))


def reference(result, checkpoint: Path):
    from edgeship.converter.llm.evaluate import LogitsRunner, Reference, windows
    from edgeship.converter.llm.pipeline import LlmSettings, _tokenize, read_heldout

    s = LlmSettings()
    ids = _tokenize(checkpoint, read_heldout(checkpoint, None))
    fp32 = result.bundle_dir / "model.fp32.onnx"
    head = result.spec.head_dim
    return Reference.measure(LogitsRunner(fp32, head), windows(ids, s.eval_seq_len,
                                                               s.eval_windows), head), ids


def genai_peer(checkpoint: Path, out: Path, ref) -> dict:
    """onnxruntime-genai's builder at int4 with its own defaults, measured like ours."""
    from edgeship.converter.llm.evaluate import LogitsRunner, compare

    folder = out / "genai-int4"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint),
           "-o", str(folder), "-p", "int4", "-e", "cpu", "-c", str(out / "cache")]
    subprocess.run(cmd, capture_output=True, check=True, timeout=3600)
    size = sum(f.stat().st_size for f in folder.glob("model.onnx*"))
    metrics = compare(LogitsRunner(folder / "model.onnx", ref.head_dim), ref)
    return {"path": folder, "file_bytes": size, **metrics}


class _LlamaLogits:
    def __init__(self, path: Path) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=1024, logits_all=True, verbose=False,
                         n_batch=1024, n_threads=2)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        self.llm.reset()
        self.llm.eval([int(t) for t in ids])
        return np.array(self.llm.scores[:len(ids)], dtype=np.float32)


def llama_peer(checkpoint: Path, out: Path, ref) -> dict | str:
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return f"llama-cpp-python is not installed ({e})"
    from bench.llm_gguf import quantize_q4_k_m, write_f32
    from edgeship.converter.llm.evaluate import compare

    f32 = write_f32(checkpoint, out / "model.f32.gguf")
    sanity = compare(_LlamaLogits(f32), ref)
    if sanity["top1_agreement"] < 0.98:
        return f"F32 GGUF disagrees with the checkpoint (top-1 {sanity['top1_agreement']:.3f})"
    q4 = quantize_q4_k_m(f32, out / "model.Q4_K_M.gguf")
    return {"path": q4, "file_bytes": q4.stat().st_size, "f32_top1": sanity["top1_agreement"],
            **compare(_LlamaLogits(q4), ref)}


def speed(rows: dict, ids: list[int], args) -> None:
    """Round-robin over the variants (one fresh process per variant and round), so a load
    change on the shared machine hits every variant alike; medians over the rounds."""
    runs: dict[str, list[dict]] = {name: [] for name in rows}
    for i in range(args.rounds):
        for name, row in rows.items():
            kind = "llama" if str(row["path"]).endswith(".gguf") else "genai"
            logger.info("speed round %d/%d: %s", i + 1, args.rounds, name)
            runs[name].append(_run(kind, row["path"], ids, args.tokens, args.threads, 2))
    for name, got in runs.items():
        rows[name].update(ttft_ms=float(np.median([g["ttft_ms"] for g in got])),
                          decode_tps=float(np.median([g["decode_tps"] for g in got])),
                          tokens=got[0]["tokens"],
                          peak_rss_mb=max(g["peak_rss_mb"] for g in got))


def full_context_rss(rows: dict, context: int, held: np.ndarray, args) -> None:
    """Peak RSS with the KV cache filled to the whole context (prompt + generated)."""
    ids = [int(t) for t in held[:context - 64]]
    for name, row in rows.items():
        if "memory_mb" in row:
            row["rss_full_ctx_mb"] = _run("genai", row["path"], ids, 63, args.threads,
                                          1)["peak_rss_mb"]


def _baseline_rss() -> float:
    code = ("import onnxruntime_genai, numpy, bench.llm_run as r; print(r._rss_mb())")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True).stdout)


def endpoint_vs_bare(int4: Path, ids: list[int], args) -> dict:
    """Client-side decode tokens/s from the agent's SSE stream vs a bare genai loop."""
    import openai

    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        proc = subprocess.Popen([sys.executable, "-m", "bench.llm_run", "agent", str(int4),
                                 "--threads", str(args.threads), "--port-file",
                                 str(port_file)])
        try:
            deadline = time.monotonic() + 120
            while not port_file.exists() or not port_file.read_text():
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("agent did not start")
                time.sleep(0.1)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port_file.read_text()}/v1",
                                   api_key="-", max_retries=0)
            port = int(port_file.read_text())
            runs: dict[str, list[float]] = {"agent": [], "sdk": [], "bare": [], "text": []}
            measure = {
                "agent": lambda: _stream_rate_raw(port, ids, args.tokens),
                "sdk": lambda: _stream_rate(client, ids, args.tokens),
                "bare": lambda: _run("genai", int4, ids, args.tokens, args.threads,
                                     1)["decode_tps"],
                "text": lambda: _run("genai-text", int4, ids, args.tokens, args.threads,
                                     1)["decode_tps"]}
            order = list(measure)
            load = [os.getloadavg()[0]]
            for i in range(args.rounds + 1):  # the first round warms every path up
                for key in (order if i % 2 else order[::-1]):  # no path always first
                    runs[key].append(measure[key]())
            load.append(os.getloadavg()[0])
            agent, sdk, bare, text = (runs[k] for k in ("agent", "sdk", "bare", "text"))
        finally:
            proc.terminate()
            proc.wait(10)
    a, o, b, t = (float(np.median(x[1:])) for x in (agent, sdk, bare, text))
    paired = [float(np.median(np.divide(x[1:], bare[1:]))) for x in (agent, sdk)]
    return {"agent_tps": a, "openai_client_tps": o, "bare_tps": b, "ratio": a / b,
            "openai_ratio": o / b, "round_ratio": paired[0], "openai_round_ratio": paired[1],
            "bare_text_tps": t, "text_ratio": a / t, "openai_text_ratio": o / t,
            "bare_text_runs": text[1:], "rounds": args.rounds, "agent_runs": agent[1:],
            "openai_runs": sdk[1:], "bare_runs": bare[1:],
            "load_avg": f"{load[0]:.2f} at the start, {load[1]:.2f} at the end"}


def _stream_rate_raw(port: int, ids: list[int], tokens: int) -> float:
    """Decode tokens/s as a minimal SSE reader sees it: tokens received (the server's
    ``usage.completion_tokens``) over the time from the first to the last content chunk. A
    chunk may carry several tokens' text (the server coalesces when the reader lags); the
    first carries the first token alone, so the decode span covers completion_tokens - 1."""
    import http.client

    body = json.dumps({"model": "pydoc-lm", "prompt": _decode_prompt(ids),
                       "max_tokens": tokens, "temperature": 0, "stream": True,
                       "ignore_eos": True, "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    events = [(time.perf_counter(), line) for line in resp if line.startswith(b"data: {")]
    conn.close()
    docs = [(t, json.loads(line[6:])) for t, line in events]
    times = [t for t, d in docs if d["choices"] and d["choices"][0]["text"]]
    return _rate(docs[-1][1]["usage"]["completion_tokens"], times)


def _rate(completion_tokens: int, content_times: list[float]) -> float:
    return (completion_tokens - 1) / (content_times[-1] - content_times[0])


def _stream_rate(client, ids: list[int], tokens: int) -> float:
    prompt = _decode_prompt(ids)
    times, used = [], 0
    for chunk in client.completions.create(model="pydoc-lm", prompt=prompt, max_tokens=tokens,
                                           temperature=0, stream=True,
                                           stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
        if chunk.usage is not None:
            used = chunk.usage.completion_tokens
    return _rate(used, times)


_TOKENIZER: dict = {}


def _decode_prompt(ids: list[int]) -> str:
    return _TOKENIZER["tok"].decode(ids)


def samples(bundle: Path, prompts: list[str], tokens: int = 48) -> dict[str, list[str]]:
    from edgeship.agent.llm.runtime import GenaiModel, SamplingParams

    out = {}
    for vid, name in (("fp32", "model.fp32.onnx"), ("int4", "model.onnx-int4.onnx")):
        model = GenaiModel(bundle / name, threads=2)
        out[vid] = [p + "".join(s.text for batch in model.generate(
            model.encode(p), SamplingParams(max_tokens=tokens, temperature=0.8, top_k=40,
                                            seed=1)) for s in batch) for p in prompts]
    return out


# --- tables -------------------------------------------------------------------------------

def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [headers, *rows]]
    return "\n".join(lines)


def main_table(rows: dict) -> str:
    fp32 = rows["onnx-fp32"]
    out = []
    for name, r in rows.items():
        out.append((name, f"{r['file_bytes'] / 2**20:.2f}",
                    f"{r['file_bytes'] / fp32['file_bytes']:.3f}", f"{r['perplexity']:.3f}",
                    f"{r['ppl_increase'] * 100:+.2f}%", f"{r['top1_agreement']:.4f}",
                    f"{r['mean_kl']:.5f}", _fmt(r.get("ttft_ms"), ".2f"),
                    _fmt(r.get("decode_tps"), ".1f"),
                    _fmt(r["decode_tps"] / fp32["decode_tps"] if "decode_tps" in r else None,
                         ".2f"), _fmt(r.get("peak_rss_mb"), ".0f")))
    return _table(("variant", "MB", "size/fp32", "ppl", "Δppl", "top-1", "KL", "TTFT ms",
                   "decode tok/s", "decode/fp32", "peak RSS MB"), out)


def memory_table(rows: dict, baseline: float) -> str:
    from edgeship import devices

    profiles = {p: devices.load_profile(p).model_memory_budget_mb
                for p in ("rpi-zero-2w", "rpi4", "rpi5", "jetson-orin-nano")}
    out = []
    for name, r in rows.items():
        if "memory_mb" not in r:
            continue
        fits = ",".join(p for p, b in profiles.items() if r["memory_mb"] <= b) or "none"
        out.append((name, f"{r['weights_mb']:.1f}", f"{r['memory_mb']:.1f}",
                    _fmt(r.get("rss_full_ctx_mb"), ".1f"),
                    _fmt(r["rss_full_ctx_mb"] - baseline if "rss_full_ctx_mb" in r else None,
                         ".1f"), fits))
    return _table(("variant", "weights MB", "need MB (admission)", "RSS full ctx MB",
                   "RSS - runtime MB", "fits budget of"), out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=Path("build/pydoc-lm"))
    p.add_argument("--out", type=Path, default=Path("bench-out/llm"))
    p.add_argument("--tokens", type=int, default=128, help="new tokens per speed run")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads for every runtime (1: the shared 2-core box)")
    p.add_argument("--skip-llama", action="store_true")
    p.add_argument("--endpoint-only", action="store_true",
                   help="only the agent's SSE endpoint vs the bare genai loop, on the int4 "
                        "variant already converted under --out (fast iteration)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("onnxruntime", "onnx_ir", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = _checkpoint(args.checkpoint)
    from transformers import AutoTokenizer
    _TOKENIZER["tok"] = AutoTokenizer.from_pretrained(checkpoint)
    if args.endpoint_only:
        endpoint_only(checkpoint, args)
        return
    result = convert(checkpoint, args.out)
    ref, held = reference(result, checkpoint)
    rows = {r.id: {"path": result.bundle_dir / _file(result, r.id), **r.metrics}
            for r in result.reports if r.passed}
    rows["genai-builder-int4"] = genai_peer(checkpoint, args.out, ref)
    llama = None if args.skip_llama else llama_peer(checkpoint, args.out, ref)
    if isinstance(llama, dict):
        rows["llama.cpp-Q4_K_M"] = llama
    ids = [int(t) for t in held[-PROMPT_TOKENS:]]
    speed(rows, ids, args)
    full_context_rss(rows, result.spec.context_length, held, args)
    endpoint = endpoint_vs_bare(rows["onnx-int4"]["path"], ids, args)
    texts = samples(result.bundle_dir, ["The for statement", "A class definition",
                                        "Exceptions are"])
    _print(rows, endpoint, texts, result, llama, _baseline_rss())
    (args.out / "results.json").write_text(json.dumps(
        {"rows": {k: {kk: str(vv) if isinstance(vv, Path) else vv for kk, vv in v.items()}
                  for k, v in rows.items()}, "endpoint": endpoint, "samples": texts,
         "export_check": result.export_check, "llm": result.spec.to_dict()}, indent=2))


def endpoint_only(checkpoint: Path, args) -> None:
    from edgeship.converter.llm.pipeline import _tokenize, read_heldout

    int4 = args.out / "bundle" / "model.onnx-int4.onnx"
    if not int4.is_file():
        raise SystemExit(f"{int4} not found: run scripts/bench-llm once without "
                         "--endpoint-only (it converts the checkpoint)")
    held = _tokenize(checkpoint, read_heldout(checkpoint, None))
    endpoint = endpoint_vs_bare(int4, [int(t) for t in held[-PROMPT_TOKENS:]], args)
    print(_endpoint_line(endpoint))
    (args.out / "endpoint.json").write_text(json.dumps(endpoint, indent=2))


def _endpoint_line(endpoint: dict) -> str:
    return (f"agent SSE endpoint, decode tok/s as a minimal SSE reader sees it: "
            f"{endpoint['agent_tps']:.1f}; as the openai client sees it: "
            f"{endpoint['openai_client_tps']:.1f}; bare onnxruntime-genai loop on the same int4 "
            f"file: {endpoint['bare_tps']:.1f} -> {endpoint['ratio']:.3f}x "
            f"({endpoint['openai_ratio']:.3f}x with the openai client; median of "
            f"{endpoint['rounds']} interleaved rounds, same threads; median of the rounds' own "
            f"ratios {endpoint['round_ratio']:.3f}x / {endpoint['openai_round_ratio']:.3f}x; "
            f"load average {endpoint['load_avg']})\n"
            f"the same loop turning each token into text (tokenizer stream decode, as "
            f"onnxruntime-genai's streaming example): {endpoint['bare_text_tps']:.1f} -> "
            f"{endpoint['text_ratio']:.3f}x ({endpoint['openai_text_ratio']:.3f}x with the "
            f"openai client)")


def _file(result, vid: str) -> str:
    from edgeship.agent.manifest import Manifest

    m = Manifest.from_bytes((result.bundle_dir / "manifest.json").read_bytes())
    return m.variant(vid).file


def _print(rows, endpoint, texts, result, llama, baseline) -> None:
    print(f"\nmodel: {result.spec.layers} layers, context {result.spec.context_length}, vocab "
          f"{result.spec.vocab_size}; held-out perplexity (fp32 ONNX) "
          f"{rows['onnx-fp32']['perplexity']:.2f}; export vs PyTorch max |Δlogit| "
          f"{result.export_check['max_abs_diff']:.2e}\n")
    print(main_table(rows))
    if isinstance(llama, str):
        print(f"llama.cpp: {llama}")
    ours = rows["onnx-int4"]
    for peer in ("genai-builder-int4", "llama.cpp-Q4_K_M"):
        if peer in rows and "decode_tps" in rows[peer]:
            r = rows[peer]
            print(f"our int4 vs {peer}: size {ours['file_bytes'] / r['file_bytes']:.2f}x, "
                  f"decode {ours['decode_tps'] / r['decode_tps']:.2f}x, TTFT "
                  f"{ours['ttft_ms'] / r['ttft_ms']:.2f}x, perplexity "
                  f"{ours['perplexity'] / r['perplexity']:.4f}x")
    print(f"\nmemory (runtime alone: {baseline:.0f} MB RSS)\n{memory_table(rows, baseline)}")
    print("\n" + _endpoint_line(endpoint))
    for vid, outs in texts.items():
        print(f"\n--- samples, {vid} (temperature 0.8, top-k 40, seed 1)")
        for t in outs:
            print(repr(t))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
