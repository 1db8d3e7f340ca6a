"""One speed measurement in a fresh process (so peak RSS is this model's alone); prints JSON.

    python -m bench.llm_run genai FILE.onnx|GENAI_DIR  --prompt-ids 1,2,3 --tokens 128
    python -m bench.llm_run genai-text ...   (the same loop, each token decoded to text)
    python -m bench.llm_run llama FILE.gguf ...
    python -m bench.llm_run agent FILE.onnx ... --port-file F   (serves until killed)

``genai`` is the bare onnxruntime-genai loop (append_tokens, generate_next_token,
get_next_tokens); a variant file is laid out as a genai folder the way the agent does it.
Greedy decoding, ``--tokens`` new tokens (EOS ignored so every run decodes as many).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np


def _rss_mb() -> float:
    """Peak RSS of this process image (VmHWM; ru_maxrss would include the parent's at fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def genai(path: Path, ids: list[int], tokens: int, threads: int, rounds: int,
          text: bool = False) -> dict:
    """``text``: also turn each token into text with the tokenizer's stream decoder, as
    onnxruntime-genai's own streaming example does (what a loop that shows text costs)."""
    import onnxruntime_genai as og

    from edgeship.agent.llm.assets import materialize

    folder = materialize(path) if path.is_file() else path
    config = og.Config(str(folder))
    config.clear_providers()
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    tokenizer = og.Tokenizer(model) if text else None
    runs = []
    for _ in range(rounds + 1):  # the first is warm-up
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + tokens, do_sample=False,
                                  min_length=len(ids) + tokens)
        gen = og.Generator(model, params)
        decode = tokenizer.create_stream().decode if tokenizer else int
        start = time.perf_counter()
        gen.append_tokens(np.asarray(ids, dtype=np.int32))
        gen.generate_next_token()
        decode(gen.get_next_tokens()[0])
        first = time.perf_counter()
        n = 1
        if text:
            while not gen.is_done() and n < tokens:
                gen.generate_next_token()
                decode(gen.get_next_tokens()[0])
                n += 1
        else:
            while not gen.is_done() and n < tokens:
                gen.generate_next_token()
                gen.get_next_tokens()
                n += 1
        end = time.perf_counter()
        del gen
        runs.append((first - start, (n - 1) / (end - first), n))
    return _summary(runs[1:])


def llama(path: Path, ids: list[int], tokens: int, threads: int, rounds: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=len(ids) + tokens + 8, n_threads=threads,
                n_threads_batch=threads, verbose=False, n_batch=512)
    runs = []
    for _ in range(rounds + 1):
        llm.reset()
        start = time.perf_counter()
        first, n = None, 0
        for _tok in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            n += 1
            if first is None:
                first = time.perf_counter()
            if n >= tokens:
                break
        end = time.perf_counter()
        runs.append((first - start, (n - 1) / (end - first), n))
    return _summary(runs[1:])


def _summary(runs: list[tuple[float, float, int]]) -> dict:
    return {"ttft_ms": float(np.median([r[0] for r in runs]) * 1000),
            "decode_tps": float(np.median([r[1] for r in runs])),
            "tokens": int(runs[0][2]), "peak_rss_mb": _rss_mb()}


def agent(path: Path, threads: int, port_file: Path) -> None:
    """Serve ``path`` on the agent's HTTP API (as an installed variant) until killed."""
    from edgeship.agent.api import InferenceHTTPServer
    from edgeship.agent.llm.http import configure
    from edgeship.agent.manifest import Manifest
    from edgeship.agent.runtime import load_runtime
    from edgeship.agent.serving import LoadedModel, ModelServer
    from edgeship.agent.store import InstalledModel

    bundle = path.parent
    manifest = Manifest.from_bytes((bundle / "manifest.json").read_bytes())
    variant = next(v for v in manifest.variants if v.file == path.name)
    inst = InstalledModel(manifest.model, manifest.version, variant, manifest, bundle)
    models = ModelServer()
    models.swap(LoadedModel(inst, load_runtime(variant.runtime, path, threads=threads)))
    configure(models, max_active=1, max_queued=4)
    server = InferenceHTTPServer("127.0.0.1", 0, models, 1 << 20)
    port_file.write_text(str(server.server_address[1]))
    server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=("genai", "genai-text", "llama", "agent"))
    p.add_argument("path", type=Path)
    p.add_argument("--prompt-ids", default="")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--port-file", type=Path)
    args = p.parse_args()
    if args.kind == "agent":
        agent(args.path, args.threads, args.port_file)
        return
    ids = [int(t) for t in args.prompt_ids.split(",") if t]
    if args.kind == "llama":
        result = llama(args.path, ids, args.tokens, args.threads, args.rounds)
    else:
        result = genai(args.path, ids, args.tokens, args.threads, args.rounds,
                       text=args.kind == "genai-text")
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
