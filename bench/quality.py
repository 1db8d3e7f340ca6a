"""scripts/bench-quality: what model-quality monitoring costs and how well it sees.

1. Per-request cost of the sketches: the quality path the agent adds after inference
   (request id, fold into the drift window, predictions for feedback), timed directly over
   many requests (folds included, amortised) and end to end as ModelServer.predict with
   and without it, against the digits CNN's own latency (bare onnxruntime). Also for a
   1x3x320x320 image and 1,000-class output (no model: the sketch path alone).
   Target: <= 5 us per request.
2. Added memory per model: tracemalloc over the quality path while 20,000 requests pass
   (window, profile, pending references, predictions waiting for the disk). Target: <= 2 MB.
3. Labelled samples needed to detect a 2-point accuracy drop (98 % -> 96 %) at 95 %
   confidence with 80 % power: the formula for the gate's test, and a simulation of it.
4. Label-free estimate vs true accuracy under three covariate shifts (rotation, Gaussian
   noise, blur) at several strengths, on digits the model never saw (the reference profile
   comes from another half of the held-out set): MAE in points, per shift, for the agent's
   estimate (difference of confidences) and ATC beside it, and offline for comparison ATC
   with negative entropy and ATC/DoC after temperature scaling. Everything is fitted on the
   reference set only; the shifts are never used to fit. Label shift and concept drift rows
   show what the estimate cannot see. Also: how far each estimate moves with the
   validation sample alone (bootstrap refits).
5. With a fleet (``--fleet``; bench/quality_fleet.py): time from the shift starting to the
   rollout halting, and false halts over N unshifted runs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeship.agent.quality import metrics
from tests.support import shifts


@dataclass
class Setup:
    bundle: Path
    x_live: np.ndarray
    y_live: np.ndarray
    accuracy: float
    x_ref: np.ndarray
    y_ref: np.ndarray


def build(out: Path, epochs: int, seed: int = 0) -> Setup:
    """Digits CNN trained on half the data; the other half split into the reference set
    (the converter's validation set → the profile) and live traffic."""
    from edgeship.converter.digits import (DIGIT_LABELS, TrainSettings, calibration_images,
                                           train_digits)
    from edgeship.converter.pipeline import convert

    trained = train_digits(settings=TrainSettings(epochs=epochs, seed=seed, test_fraction=0.5))
    d = trained.data
    ref_x, ref_y, live_x, live_y = d.x_test[::2], d.y_test[::2], d.x_test[1::2], d.y_test[1::2]
    result = convert(trained.model, d.x_train[:1], calibration_images(d, seed=seed), ref_x,
                     ref_y, out / "bundle", "digits", 1, labels=DIGIT_LABELS)
    return Setup(result.bundle_dir, live_x, live_y, trained.test_accuracy, ref_x, ref_y)


def _served(bundle: Path, variant: str = "onnx-fp32", quality: bool = True):
    from edgeship.agent.quality.hub import QualityHub

    hub = QualityHub(Path(tempfile.mkdtemp(prefix="bench-quality-"))) if quality else None
    return shifts.serve_bundle(bundle, variant, quality=hub), hub


# --- 1. cost ----------------------------------------------------------------------------

def _best_us(fn: Callable[[], None], calls: int, rounds: int = 7) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter_ns() - t0) / calls / 1000)
    return best


def _interleaved(a: Callable[[], None], b: Callable[[], None], calls: int,
                 rounds: int = 9) -> tuple[float, float]:
    """Best per-call us of ``a`` and ``b``, timed in alternating rounds (load drifts)."""
    best_a = best_b = float("inf")
    for _ in range(rounds):
        best_a = min(best_a, _best_us(a, calls, rounds=1))
        best_b = min(best_b, _best_us(b, calls, rounds=1))
    return best_a, best_b


def sketch_cost(setup: Setup, calls: int) -> list[dict[str, Any]]:
    import onnxruntime as ort

    server, hub = _served(setup.bundle)
    entry = server._serving["digits"]
    x = setup.x_live[:1]
    outputs = entry.run({entry.input_name: x})
    inputs = {entry.input_name: x}
    observe = entry.observe
    path_us = _best_us(lambda: observe(inputs, outputs, 1), calls)
    sess = ort.InferenceSession(str(setup.bundle / "model.fp32.onnx"),
                                providers=["CPUExecutionProvider"])
    opts = sess.get_inputs()[0].name
    bare_us = _best_us(lambda: sess.run(None, {opts: x}), calls // 4)
    plain, _ = _served(setup.bundle, quality=False)
    off_us, on_us = _interleaved(lambda: plain.predict("digits", x),
                                 lambda: server.predict("digits", x), calls // 4)
    image_us = _image_cost(calls // 20)
    hub.stop()
    return [{"what": "digits CNN, bare onnxruntime run", "us": bare_us},
            {"what": "ModelServer.predict, quality off", "us": off_us},
            {"what": "ModelServer.predict, quality on", "us": on_us},
            {"what": "quality path alone (id + sketches + predictions, folds amortised)",
             "us": path_us, "fraction_of_model": path_us / off_us},
            {"what": "quality path, 1x3x320x320 float input, 1000 classes (no model)",
             "us": image_us}]


def _image_cost(calls: int) -> float:
    """The sketch path for a large image input (folds every request: 1.2 MB each)."""
    from edgeship.agent.manifest import TensorSpec
    from edgeship.agent.quality.drift import WindowSettings
    from edgeship.agent.quality.monitor import ModelQuality, VersionSketch, VersionTracker
    from edgeship.agent.quality.profile import parse_profile
    from edgeship.converter.profile import build_profile

    rng = np.random.default_rng(0)
    ref = rng.random((64, 3, 320, 320), dtype=np.float32)
    logits = rng.normal(size=(64, 1000)).astype(np.float32)
    doc = build_profile({"image": ref}, [logits],
                        input_specs=[TensorSpec("image", "float32", (None, 3, 320, 320))],
                        output_specs=[TensorSpec("logits", "float32", (None, 1000))],
                        task="classification", y=logits.argmax(1))
    profile = parse_profile(doc)
    tracker = VersionTracker(1, "onnx-fp32", "classification", profile.score,
                             VersionSketch(profile, "onnx-fp32", WindowSettings()), ["image"])
    tracker.bind_outputs(["logits"])
    mq = ModelQuality("image", lambda model, folded: None)
    x, out = {"image": ref[:1]}, [logits[:1]]
    return _best_us(lambda: mq.observe(tracker, x, out, 1), calls, rounds=3)


# --- 2. memory ---------------------------------------------------------------------------

def memory(setup: Setup, requests: int = 20_000) -> dict[str, float]:
    server, hub = _served(setup.bundle)
    entry = server._serving["digits"]
    x = setup.x_live[:1]
    outputs = entry.run({entry.input_name: x})
    tracemalloc.start()
    base = tracemalloc.take_snapshot()
    for i in range(requests):
        entry.observe({entry.input_name: x}, [outputs[0].copy()], 1)
    hub.fold_all()
    peak = tracemalloc.get_traced_memory()[1]
    current = tracemalloc.take_snapshot().compare_to(base, "filename")
    tracemalloc.stop()
    held = sum(s.size_diff for s in current)
    window = hub.nbytes
    hub.stop()
    return {"window_bytes": window, "held_after_bytes": held,
            "peak_traced_bytes": peak, "requests": requests}


_RSS_CHILD = """
import sys, tempfile, time, numpy as np
from pathlib import Path
from edgeship.agent.quality.hub import QualityHub
from edgeship.agent import spool  # the agent has SQLite loaded anyway (telemetry spool)
from tests.support.shifts import serve_bundle
hub = QualityHub(Path(tempfile.mkdtemp())) if sys.argv[2] == "on" else None
if hub is not None:
    hub.start()  # flushes every 2 s, as in the agent
server = serve_bundle(Path(sys.argv[1]), quality=hub)
x = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
for i in range(20000):
    server.predict("digits", x)
    if i % 1000 == 0:
        time.sleep(0.1)  # traffic over a few seconds, not one burst
if hub is not None:
    hub.stop()
print(int(open("/proc/self/statm").read().split()[1]) * 4096)
"""


def rss_delta(setup: Setup) -> dict[str, float]:
    """Resident memory of a fresh process serving the digits CNN after 20,000 requests,
    with and without the quality hub (its SQLite connection, flush thread, sketches);
    both load SQLite, as an agent does for its telemetry spool."""
    import subprocess
    import sys

    out = {}
    for mode in ("off", "on"):
        proc = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(setup.bundle), mode],
                              capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[1])
        out[mode] = int(proc.stdout.split()[-1]) / 2**20
    return {"rss_off_mb": out["off"], "rss_on_mb": out["on"],
            "delta_mb": out["on"] - out["off"]}


# --- 3. samples to detect a drop ------------------------------------------------------------

def samples_needed(p_old: float = 0.98, drop: float = 0.02, margin: float = 0.005,
                   sims: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    rows = []
    for label, old_n, gate_margin in (("both versions measured in the field", None, 0.0),
                                      ("previous version well measured (100k labels)",
                                       100_000, 0.0),
                                      ("both, with max_accuracy_drop = 0.005 (default 0)",
                                       None, margin)):
        n = metrics.samples_to_detect(p_old, drop, old_n=old_n, margin=gate_margin)
        rows.append({"case": label, "samples": n,
                     "simulated_power": _power(p_old, drop, n, old_n or n, gate_margin,
                                               sims, seed)})
    return rows


def _power(p_old: float, drop: float, n_new: int, n_old: int, margin: float, sims: int,
           seed: int) -> float:
    rng = np.random.default_rng(seed)
    k_new = rng.binomial(n_new, p_old - drop, sims)
    k_old = rng.binomial(n_old, p_old, sims)
    hits = 0
    for a, b in zip(k_old, k_new):
        c = metrics.compare(a / n_old, metrics.proportion_se(int(a), n_old), b / n_new,
                            metrics.proportion_se(int(b), n_new), margin=margin,
                            confidence=0.95)
        hits += c.worse
    return hits / sims


# --- 4. estimate vs truth -------------------------------------------------------------------

SHIFTS = {"rotation": [5, 10, 15, 20, 25, 30], "noise": [0.1, 0.2, 0.3, 0.4],
          "blur": [0.5, 0.75, 1.0, 1.25]}


def _run(bundle: Path, x: np.ndarray, variant: str) -> tuple[np.ndarray, dict[str, Any]]:
    """The served model's logits on ``x`` one request at a time, and the agent's estimate
    (its report: DoC, with ATC beside it)."""
    server, hub = _served(bundle, variant)
    logits = np.concatenate([server.predict("digits", x[i:i + 1])[0][0]
                             for i in range(len(x))])
    drift = hub.telemetry({"digits": (1, variant)})["digits"]["drift"]
    hub.stop()
    worst = max((s["js"] or 0.0 for name, s in drift["signals"].items()
                 if name.startswith("input")), default=0.0)
    return logits, {**drift["estimate"], "input_js": worst}


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature scaling: the T minimising the validation negative log-likelihood."""
    from scipy.optimize import minimize_scalar

    from edgeship.agent.quality.features import class_probabilities

    def nll(log_t: float) -> float:
        p = class_probabilities(logits / np.exp(log_t), "logits")
        return float(-np.log(p[np.arange(len(y)), y] + 1e-300).mean())
    return float(np.exp(minimize_scalar(nll, bounds=(-3, 3), method="bounded").x))


def _offline(ref: np.ndarray, y_ref: np.ndarray) -> dict[str, Callable[[np.ndarray], float]]:
    """Estimators the agent does not run, fitted on the same validation outputs, for
    comparison: ATC with negative entropy, ATC / DoC after temperature scaling, and DoC
    capped by the predicted class mix (accuracy <= 1 - the total variation distance between
    the live predicted classes and the validation labels: assumes no label shift)."""
    from edgeship.agent.quality.features import atc_scores, class_probabilities
    from edgeship.converter.profile import atc_threshold

    temp = fit_temperature(ref, y_ref)
    acc = float((ref.argmax(1) == y_ref).mean())

    def atc(score: str, t_scale: float) -> Callable[[np.ndarray], float]:
        probs = class_probabilities(ref / t_scale, "logits")
        t, _ = atc_threshold(atc_scores(probs, score), probs.argmax(1) == y_ref)
        return lambda z: float((atc_scores(class_probabilities(z / t_scale, "logits"), score)
                                > t).mean())

    conf_ref = class_probabilities(ref / temp, "logits").max(1).mean()
    mix = np.bincount(y_ref, minlength=ref.shape[1]) / len(y_ref)
    conf_plain = class_probabilities(ref, "logits").max(1).mean()

    def capped(z: np.ndarray) -> float:
        probs = class_probabilities(z, "logits")
        live = np.bincount(probs.argmax(1), minlength=len(mix)) / len(z)
        return min(acc + probs.max(1).mean() - conf_plain, 1 - np.abs(live - mix).sum() / 2)
    return {"ATC, negative entropy": atc("negative_entropy", 1.0),
            "DoC capped by the predicted class mix": capped,
            f"ATC after temperature scaling (T = {temp:.3f})": atc("confidence", temp),
            f"DoC after temperature scaling (T = {temp:.3f})":
                lambda z: acc + class_probabilities(z / temp, "logits").max(1).mean()
                - conf_ref}


def _cases(setup: Setup):
    x, y = setup.x_live, setup.y_live
    yield "none", 0, x, y
    for kind, levels in SHIFTS.items():
        for level in levels:
            yield kind, level, shifts.COVARIATE[kind](x, level), y
    xs, ys = shifts.label_shift(x, y, (1, 7, 8, 9))
    yield "label shift (only 1, 7, 8, 9)", "", xs, ys
    yield "concept drift (labels permuted)", "", x, shifts.concept_drift(y)


AGENT = {"DoC (the agent's estimate)": "doc", "ATC, max probability (agent, beside it)": "atc"}


def tracking(setup: Setup, variant: str = "onnx-fp32") -> tuple[list[dict], dict[str, Any]]:
    """Per case: true accuracy, the agent's two estimates (DoC and max-probability ATC)
    and the offline ones (:func:`_offline`), all fitted on the same reference set only."""
    ref, _ = _run(setup.bundle, setup.x_ref, variant)
    offline = _offline(ref, setup.y_ref)
    rows, unshifted = [], None
    for kind, level, x, y in _cases(setup):
        logits, est = _run(setup.bundle, x, variant)
        unshifted = logits if unshifted is None else unshifted
        values = {"doc": est["accuracy"], "atc": est["atc"]["accuracy"]}
        values.update({name: fn(logits) for name, fn in offline.items()})
        rows.append({"shift": kind, "level": level, "estimates": values,
                     "accuracy": float((logits.argmax(1) == y).mean()),
                     "input_js": est["input_js"]})
    names = {**AGENT, **{k: k for k in offline}}
    mae: dict[str, dict[str, float]] = {}
    for what, key in names.items():
        err = [(r["shift"], r["accuracy"], abs(r["estimates"][key] - r["accuracy"]) * 100)
               for r in rows if r["shift"] in SHIFTS]
        mae[what] = {kind: float(np.mean([e for k, _, e in err if k == kind]))
                     for kind in SHIFTS}
        mild = [e for _, a, e in err if a >= 0.85]
        shifted_mix = next(r for r in rows if r["shift"].startswith("label shift"))
        mae[what].update({"mild (accuracy >= 85 %)": float(np.mean(mild)),
                          "mild, largest": float(np.max(mild)),
                          "unshifted error": (rows[0]["estimates"][key]
                                              - rows[0]["accuracy"]) * 100,
                          "label shift error": (shifted_mix["estimates"][key]
                                                - shifted_mix["accuracy"]) * 100})
    return rows, {"mae": mae, "bootstrap": validation_bootstrap(ref, setup.y_ref, unshifted,
                                                                setup.y_live)}


def validation_bootstrap(ref: np.ndarray, y_ref: np.ndarray, live: np.ndarray,
                         y_live: np.ndarray, draws: int = 300, seed: int = 0
                         ) -> dict[str, tuple[float, float]]:
    """How much each estimate moves with the validation sample alone: refit on bootstrap
    resamples of the reference set; (mean, sd) of the error in points on the unshifted
    live traffic."""
    from edgeship.agent.quality.features import atc_scores, class_probabilities
    from edgeship.converter.profile import atc_threshold

    rng = np.random.default_rng(seed)
    probs, live_probs = class_probabilities(ref, "logits"), class_probabilities(live, "logits")
    correct = probs.argmax(1) == y_ref
    truth = float((live_probs.argmax(1) == y_live).mean())
    live_conf, live_scores = float(live_probs.max(1).mean()), live_probs.max(1)
    errors: dict[str, list[float]] = {"atc": [], "doc": []}
    for _ in range(draws):
        i = rng.integers(0, len(ref), len(ref))
        t, acc = atc_threshold(atc_scores(probs[i], "confidence"), correct[i])
        errors["atc"].append(float((live_scores > t).mean()) - truth)
        errors["doc"].append(acc + live_conf - float(probs[i].max(1).mean()) - truth)
    return {k: (float(np.mean(v)) * 100, float(np.std(v)) * 100) for k, v in errors.items()}


# --- output ---------------------------------------------------------------------------------

def _print(results: dict[str, Any]) -> None:
    if "cost" in results:
        print("\n1. per-request cost (best of 7-9 rounds; load noted below)")
    for r in results.get("cost", ()):
        extra = f"  = {r['fraction_of_model']:.1%} of the served model's latency" \
            if "fraction_of_model" in r else ""
        print(f"   {r['what']:<74} {r['us']:8.2f} us{extra}")
    if "memory" in results:
        _print_memory(results["memory"])
    if "samples" in results:
        print("\n3. labelled samples to detect 98 % -> 96 % (one-sided 95 %, 80 % power)")
    for r in results.get("samples", ()):
        print(f"   {r['case']:<52} {r['samples']:6d} samples  simulated power "
              f"{r['simulated_power']:.0%}")
    for variant, (rows, mae) in results.get("tracking", {}).items():
        _print_tracking(variant, rows, mae)


def _print_memory(m: dict[str, Any]) -> None:
    print(f"\n2. memory per model: window {m['window_bytes'] / 1024:.0f} KiB; held after "
          f"{m['requests']} requests {m['held_after_bytes'] / 1024:.0f} KiB; traced peak "
          f"{m['peak_traced_bytes'] / 2**20:.2f} MiB")
    print(f"   a fresh process after 20,000 requests: RSS {m['rss_off_mb']:.1f} MiB without "
          f"quality, {m['rss_on_mb']:.1f} MiB with it ({m['delta_mb']:+.1f} MiB: SQLite, the "
          "flush thread, sketches)")


def _print_tracking(variant: str, rows: list[dict], found: dict[str, Any]) -> None:
    print(f"\n4. label-free estimate vs true accuracy ({variant}, {len(rows)} runs; every "
          "estimator fitted on the reference set only)")
    print(f"   {'shift':<34}{'level':>7}{'accuracy':>10}{'DoC':>9}{'error':>8}"
          f"{'ATC':>9}{'error':>8}{'input drift JS':>16}")
    for r in rows:
        e = r["estimates"]
        print(f"   {r['shift']:<34}{str(r['level']):>7}{r['accuracy']:>10.1%}"
              f"{e['doc']:>9.1%}{(e['doc'] - r['accuracy']) * 100:>+8.1f}"
              f"{e['atc']:>9.1%}{(e['atc'] - r['accuracy']) * 100:>+8.1f}"
              f"{r['input_js']:>16.3f}")
    print("   MAE in points (mild: the covariate rows with true accuracy >= 85 %, target 3):")
    for what, m in found["mae"].items():
        print(f"     {what:<48}" + ", ".join(f"{k} {v:.1f}" for k, v in m.items()))
    print("   the validation sample alone (300 bootstrap refits; error on unshifted traffic):")
    for key, (mean, sd) in found["bootstrap"].items():
        print(f"     {'DoC' if key == 'doc' else 'ATC'}: mean {mean:+.1f}, sd {sd:.1f} points")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench-quality", description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--calls", type=int, default=20_000)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--fleet", action="store_true", help="also run the fleet rows (5)")
    ap.add_argument("--runs", type=int, default=20, help="unshifted runs for false halts")
    ap.add_argument("--sections", default="1,2,3,4",
                    help="which of 1 cost, 2 memory, 3 samples, 4 tracking to run (1,2,3,4)")
    args = ap.parse_args(argv)
    import os
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        setup = build(Path(tmp), args.epochs)
        results: dict[str, Any] = {"load": os.getloadavg()[0]}
        wanted = set(args.sections.split(","))
        if "1" in wanted:
            results["cost"] = sketch_cost(setup, args.calls)
        if "2" in wanted:
            results["memory"] = {**memory(setup), **rss_delta(setup)}
        if "3" in wanted:
            results["samples"] = samples_needed()
        if "4" in wanted:
            results["tracking"] = {v: tracking(setup, v) for v in ("onnx-fp32", "onnx-int8")}
        if args.fleet:
            from bench.quality_fleet import fleet_rows
            results["fleet"] = fleet_rows(setup, args.runs)
    _print(results)
    if "fleet" in results:
        from bench.quality_fleet import print_fleet
        print_fleet(results["fleet"])
    print(f"\nload average {results['load']:.1f} at the start; {time.time() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
