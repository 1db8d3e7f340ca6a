"""scripts/bench-agent: what the agent costs on top of the runtime it drives.

1. In-process inference through the agent (``ModelServer.predict``: signature checks,
   stats) vs a bare ``onnxruntime.InferenceSession.run``
   and a bare LiteRT ``set_tensor`` + ``invoke`` + ``get_tensor``: same model file, same
   input array, same threads (1 by default), contenders alternated in short rounds. Rows:
   the digits CNN at batch 1 and 32 and a wider CNN at batch 1 (the model dominates).
   What the agent calls underneath: onnxruntime's C-level ``InferenceSession._sess.run``
   with output names resolved at load (the public ``run`` adds Python-side checks; the
   "C-level floor" row times that call bare); LiteRT's C-level ``SetTensor`` / ``Invoke`` /
   ``GetTensor`` (the public methods wrap them). A litert-torch model has a fixed batch of
   1, so a batch runs row by row: both slice the rows, run them and concatenate the
   outputs (what a caller needs for a batch answer).
   The "+ NaN/inf scan" rows call ``predict(..., check_values=True)``, what the local API
   does for outside callers: the signature checks plus a scan of float inputs for NaN or
   infinity (a bare runtime does no such scan; in-process callers skip it by default).
   Target: p50 ratio <= 1.05.
2. Local API overhead (HTTP on 127.0.0.1 and the Unix socket, .npy and JSON) over the bare
   call. Target: <= 1 ms at p50. Then the Open Inference Protocol with the Triton client
   (``bench/agent_oip.py``): v2 JSON, v2 binary, gRPC over TCP and the Unix socket, beside
   the bare session and /v1 JSON in one interleaved run, on the digits CNN and a
   1x3x320x320 image. Targets: gRPC and v2 binary <= +0.5 ms (digits), v2 JSON no slower
   than /v1 JSON, binary <= +2 ms (image).
3. Idle RSS of an agent process (``agent.daemon.Agent`` started, broker connected, the model
   served and used once) vs a bare Python process holding the same onnxruntime session after
   one run. Target: <= +15 MB.
4. Idle CPU of the agent over ``--idle-s`` seconds (default 60, broker connected, default
   60 s telemetry interval). Target: < 1 %.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

from bench.agent_model import loaded

ROOT = Path(__file__).resolve().parents[1]


# --- models --------------------------------------------------------------------------------

def build_models(out: Path, epochs: int) -> dict[str, dict[str, Path]]:
    """{"digits": {runtime: file}, "wide CNN": {...}}: the trained digits CNN and the
    converter benchmark's wider CNN (untrained: only its cost matters here)."""
    from bench.converter import wide_cnn
    from edgeship.converter.digits import load_digits_data, train_digits

    trained = train_digits(epochs=epochs)
    x = load_digits_data().x_test[:1]
    return {"digits": _export(trained.model, x, out / "digits"),
            "wide CNN": _export(wide_cnn().eval(), x, out / "wide")}


def _export(model, x: np.ndarray, stem: Path) -> dict[str, Path]:
    from edgeship.converter.export import export_onnx

    models = {"onnxruntime": export_onnx(model, x, stem.with_suffix(".onnx"))}
    try:
        from edgeship.converter.tflite import available, export_tflite
        if available():
            models["litert"] = export_tflite(model, x, stem.with_suffix(".tflite"))
    except ImportError:
        pass
    return models


def _onnx_input(path: Path) -> str:
    import onnxruntime as ort
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]) \
        .get_inputs()[0].name


# --- timing --------------------------------------------------------------------------------

def timed(fn, n: int) -> np.ndarray:
    out = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter_ns()
        fn()
        out[i] = (time.perf_counter_ns() - t0) / 1e6
    return out


def interleaved(fns: dict[str, object], n: int, rounds: int = 20) -> dict[str, np.ndarray]:
    """Alternate the contenders in short rounds so a noisy neighbour hits all of them."""
    for fn in fns.values():
        timed(fn, 200)  # warm up
    per = max(1, n // rounds)
    got: dict[str, list[np.ndarray]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            got[name].append(timed(fn, per))
    return {k: np.concatenate(v) for k, v in got.items()}


def _bare_session(path: Path, threads: int):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=opts,
                                providers=["CPUExecutionProvider"])


def bare_onnx(path: Path, threads: int, x: np.ndarray):
    """What an onnxruntime user writes: the public ``InferenceSession.run``."""
    sess = _bare_session(path, threads)
    feed = {sess.get_inputs()[0].name: x}
    return lambda: sess.run(None, feed)


def bare_onnx_c_level(path: Path, threads: int, x: np.ndarray):
    """The floor under the agent: the C-level run the public one wraps (reference only)."""
    sess = _bare_session(path, threads)
    feed = {sess.get_inputs()[0].name: x}
    names = [o.name for o in sess.get_outputs()]
    run = sess._sess.run
    return lambda: run(names, feed, None)


def bare_litert(path: Path, threads: int, x: np.ndarray):
    """The public ``set_tensor`` + ``invoke`` + ``get_tensor`` on an interpreter with the
    agent's settings. litert-torch models have a fixed batch of 1, so a batch is sliced
    into rows, run row by row and the outputs concatenated (the batch answer)."""
    from ai_edge_litert.interpreter import Interpreter
    interp = Interpreter(model_path=str(path), num_threads=threads)
    interp.allocate_tensors()
    i_idx = interp.get_input_details()[0]["index"]
    o_idx = interp.get_output_details()[0]["index"]
    if x.shape[0] == 1:
        def run_one():
            interp.set_tensor(i_idx, x)
            interp.invoke()
            return interp.get_tensor(o_idx)
        return run_one

    def run_rows():
        outs = []
        for r in range(x.shape[0]):
            interp.set_tensor(i_idx, x[r:r + 1])
            interp.invoke()
            outs.append(interp.get_tensor(o_idx))
        return np.concatenate(outs)
    return run_rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench-agent", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", default="1,32", help="batch sizes for the digits CNN rows")
    ap.add_argument("-n", type=int, default=6000, help="timed calls per contender")
    ap.add_argument("--idle-s", type=float, default=60.0)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--no-wide", action="store_true", help="skip the wide CNN row")
    ap.add_argument("--no-oip", action="store_true",
                    help="skip the Open Inference Protocol rows (v2 HTTP, gRPC)")
    ap.add_argument("--rss-only", action="store_true",
                    help="only the idle rows (RSS, then idle CPU over --idle-s): no timing")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    results: dict[str, object] = {"load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp:
        models = build_models(Path(tmp), args.epochs)
        digits = models["digits"]
        name = _onnx_input(digits["onnxruntime"])
        rows = [] if args.rss_only else run_timed(models, args, results, name)
        rows += run_idle(digits["onnxruntime"], args.threads, args.idle_s, Path(tmp),
                         results, name)
    results["load_after"] = os.getloadavg()
    print_table(rows, results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    return 0


def run_timed(models, args, results, name) -> list[tuple]:
    """Sections 1 and 2: in-process inference, the local API and the OIP rows."""
    digits = models["digits"]
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        rows += run_inference(digits, args.threads, args.n, _input(batch), results,
                              "digits", name)
    if not args.no_wide:
        wide = models["wide CNN"]
        rows += run_inference(wide, args.threads, max(600, args.n // 3), _input(1),
                              results, "wide CNN", _onnx_input(wide["onnxruntime"]))
    rows += run_api(digits["onnxruntime"], args.threads, args.n // 6, _input(1), results,
                    name)
    if not args.no_oip:
        from bench.agent_oip import run_json_memory, run_oip
        rows += run_oip(digits["onnxruntime"], args.threads, args.n // 6, _input(1),
                        results, bare_onnx, interleaved, _ms)
        rows += run_json_memory(results)
    return rows


def _input(batch: int) -> np.ndarray:
    from edgeship.converter.digits import load_digits_data
    return np.ascontiguousarray(load_digits_data().x_test[:batch])


def run_inference(models, threads, n, x, results, label, input_name) -> list[tuple]:
    ort_model = models["onnxruntime"]
    agent_ort = loaded(ort_model, "onnxruntime", threads, input_name)
    contenders = {"bare onnxruntime": bare_onnx(ort_model, threads, x),
                  "C-level floor": bare_onnx_c_level(ort_model, threads, x),
                  "agent onnxruntime": lambda: agent_ort.predict("digits", x),
                  "agent onnxruntime scanned":
                      lambda: agent_ort.predict("digits", x, check_values=True)}
    if "litert" in models:
        agent_lite = loaded(models["litert"], "litert", threads, input_name)
        contenders["bare LiteRT invoke"] = bare_litert(models["litert"], threads, x)
        contenders["agent LiteRT"] = lambda: agent_lite.predict("digits", x)
        contenders["agent LiteRT scanned"] = \
            lambda: agent_lite.predict("digits", x, check_values=True)
    t = interleaved(contenders, n)
    b = f" [{label} b{x.shape[0]}]"
    rows = [("bare onnxruntime" + b, _ms(t["bare onnxruntime"]), "", "", ""),
            ("  C-level _sess.run" + b, _ms(t["C-level floor"]),
             _vs(t["C-level floor"], t["bare onnxruntime"]), "(reference)", "")]
    for bare, mine in (("bare onnxruntime", "agent onnxruntime"),
                       ("bare LiteRT invoke", "agent LiteRT")):
        if bare not in t:
            rows.append((mine + b, "-", "-", "-", "no LiteRT model (litert-torch)"))
            continue
        ratio = np.median(t[mine]) / np.median(t[bare])
        results[f"{mine}{b} p50 ratio"] = ratio
        if bare != "bare onnxruntime":
            rows.append((bare + b, _ms(t[bare]), "", "", ""))
        rows.append((mine + b, _ms(t[mine]), _vs(t[mine], t[bare]), "<= x1.05",
                     "ok" if ratio <= 1.05 else "MISS"))
        scanned = t[mine + " scanned"]
        results[f"{mine} scanned{b} p50 ratio"] = np.median(scanned) / np.median(t[bare])
        rows.append(("  + NaN/inf scan (as the local API)" + b, _ms(scanned),
                     _vs(scanned, t[bare]), "(reference)", ""))
    results[f"inference_ms{b}"] = {k: _pcts(v) for k, v in t.items()}
    results.setdefault("bare_p50_ms", float(np.median(t["bare onnxruntime"])))
    return rows


def _vs(mine: np.ndarray, bare: np.ndarray) -> str:
    ratio = np.median(mine) / np.median(bare)
    over_us = 1000 * (np.median(mine) - np.median(bare))
    return f"x{ratio:.3f} ({over_us:+.1f} us)"


def run_api(model: Path, threads, n, x, results, input_name) -> list[tuple]:
    from edgeship.agent.api import InferenceHTTPServer, InferenceUnixServer
    from edgeship.agent.client import AgentClient

    server = loaded(model, "onnxruntime", threads, input_name)
    tmp = Path(tempfile.mkdtemp(prefix="bench-api-"))
    tcp = InferenceHTTPServer("127.0.0.1", 0, server, 16 * 2**20)
    unix = InferenceUnixServer(tmp / "api.sock", server, 16 * 2**20)
    tcp.start()
    unix.start()
    bare = bare_onnx(model, threads, x)
    try:
        with AgentClient(tcp.url) as ct, AgentClient(unix.url) as cu, \
                AgentClient(tcp.url) as cj:
            t = interleaved({"bare": bare, "HTTP .npy": lambda: ct.predict("digits", x),
                             "unix .npy": lambda: cu.predict("digits", x),
                             "HTTP JSON": lambda: cj.predict_json("digits", x)}, n)
    finally:
        tcp.stop()
        unix.stop()
    rows = []
    base = np.median(t.pop("bare"))
    for name, lat in t.items():
        over = float(np.median(lat) - base)
        results[f"api overhead {name} ms"] = over
        rows.append((f"API {name}", _ms(lat), f"+{over:.3f} ms", "<= +1 ms",
                     "ok" if over <= 1.0 else "MISS"))
    return rows


AGENT_SNIPPET = textwrap.dedent("""
    import sys, time, threading
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from edgeship.agent.config import config_from_dict
    from edgeship.agent.daemon import Agent
    from bench.agent_model import loaded
    cfg = config_from_dict({cfg!r})
    agent = Agent(cfg)
    src = loaded(Path({model!r}), "onnxruntime", {threads}, {input_name!r})
    agent.server.swap(src.get("digits"))
    agent.start()
    agent.session.wait_connected(10)
    import numpy as np
    agent.server.predict("digits", np.zeros((1, 1, 8, 8), np.float32))
    print("ready", flush=True)
    sys.stdin.read()
    agent.stop()
""")

BARE_SNIPPET = textwrap.dedent("""
    import sys
    import numpy as np, onnxruntime as ort
    opts = ort.SessionOptions(); opts.intra_op_num_threads = {threads}
    s = ort.InferenceSession({model!r}, sess_options=opts, providers=["CPUExecutionProvider"])
    s.run(None, {{s.get_inputs()[0].name: np.zeros((1, 1, 8, 8), np.float32)}})
    print("ready", flush=True)
    sys.stdin.read()
""")


def _spawn(code: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, cwd=ROOT)
    line = p.stdout.readline()
    if line.strip() != "ready":
        p.kill()
        raise RuntimeError(f"benchmark child did not start: {line!r}")
    return p


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_idle(model: Path, threads, idle_s, tmp: Path, results, input_name) -> list[tuple]:
    from edgeship.fleet.broker import Mosquitto, free_port

    broker = Mosquitto().start()
    state = tmp / "state"
    (state / "tuf").mkdir(parents=True)
    (state / "tuf" / "root.json").write_text("{}")
    cfg = {"device_id": "bench", "state_dir": str(state), "mqtt_url": broker.url,
           "api_port": free_port()}
    agent = bare = None
    try:
        agent = _spawn(AGENT_SNIPPET.format(root=str(ROOT), cfg=cfg, model=str(model),
                                            threads=threads, input_name=input_name))
        bare = _spawn(BARE_SNIPPET.format(model=str(model), threads=threads))
        time.sleep(3)
        rss_agent, rss_bare = _rss_mb(agent.pid), _rss_mb(bare.pid)
        cpu0, t0 = _cpu_s(agent.pid), time.monotonic()
        time.sleep(idle_s)
        cpu_pct = 100 * (_cpu_s(agent.pid) - cpu0) / (time.monotonic() - t0)
    finally:
        for p in (agent, bare):
            if p is not None:
                p.stdin.close()
                p.wait(20)
        broker.cleanup()
    delta = rss_agent - rss_bare
    results.update({"rss_agent_mb": rss_agent, "rss_bare_mb": rss_bare,
                    "idle_cpu_percent": cpu_pct, "idle_s": idle_s})
    return [("RSS bare session", f"{rss_bare:.1f} MB", "", "", ""),
            ("RSS agent (model loaded)", f"{rss_agent:.1f} MB", f"+{delta:.1f} MB",
             "<= +15 MB", "ok" if delta <= 15 else "MISS"),
            (f"agent idle CPU ({idle_s:.0f} s)", f"{cpu_pct:.3f} %", "", "< 1 %",
             "ok" if cpu_pct < 1 else "MISS")]


def _pcts(v: np.ndarray) -> dict[str, float]:
    p50, p95, p99 = np.percentile(v, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "n": int(v.size)}


def _ms(v: np.ndarray) -> str:
    p = _pcts(v)
    return f"{p['p50']:.4f} / {p['p95']:.4f} / {p['p99']:.4f} ms"


def print_table(rows: list[tuple], results: dict) -> None:
    head = ("measure", "p50 / p95 / p99", "vs bare (p50)", "target", "")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(5)]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    print(line(head))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))
    la, lb = results["load_before"], results["load_after"]
    bare = f"; bare onnxruntime p50 {results['bare_p50_ms']:.3f} ms" \
        if "bare_p50_ms" in results else ""
    print(f"\nload average before {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}, after "
          f"{lb[0]:.2f} {lb[1]:.2f} {lb[2]:.2f}; {os.cpu_count()} CPUs{bare}")


if __name__ == "__main__":
    sys.exit(main())
