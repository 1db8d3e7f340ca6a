"""``scripts/bench-converter --zoo``: every zoo model (tests/support/zoo.py, built here, no
downloads) through ``edgeship convert --device rpi4``, side by side with onnxruntime's
default quantization of the same file.

Per model: the variants that passed their gate, the int8 variant an rpi4 would run (its
size and p50 against fp32) and the task's quality metric against the fp32 source (top-1
agreement for classifiers, per step for sequences, per pixel for segmenters; the lowest
output cosine otherwise), next to ``quant_pre_process`` + ``quantize_static`` and
``quantize_dynamic`` with their defaults. Latency: single sample, one thread, p50, every
variant of a model timed round-robin so they see the same machine load.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path


logger = logging.getLogger(__name__)

RUNS = 300
#: the metric a task is judged by (and its name in the table)
QUALITY = {"classification": "agreement", "sequence": "agreement",
           "segmentation": "agreement"}


def _builders(full: bool):
    from tests.support import zoo

    return [
        ("yolo", lambda r: zoo.yolo_detector(r, width=16 if full else 8, size=160, samples=16)),
        ("vad", lambda r: zoo.recurrent_vad(r, hidden=64, samples=16)),
        ("ocr_rec", lambda r: zoo.paddle_ocr_rec(r, width=160, samples=16)),
        ("tf_seg", lambda r: zoo.tf_segmenter(r, size=128, samples=16)),
        ("fixed1", lambda r: zoo.fixed_batch_classifier(r, samples=32)),
        ("minilm", lambda r: zoo.minilm_encoder(r, seq=32)),
    ]


def _convert(model, out: Path) -> dict:
    from edgeship.converter.options import plan
    from edgeship.converter.pipeline import ConvertSettings, convert_onnx
    from edgeship.converter.samples import RawData, load_npz_arrays

    the_plan = plan(device="rpi4", variants=None, threads=1, gate_overrides={},
                    source="onnx")
    settings = ConvertSettings(gate=the_plan.gate, variants=the_plan.variants,
                               task=model.task if model.task != "generic" else None)
    calib, val = (RawData(*load_npz_arrays(p), str(p)) for p in (model.data, model.val))
    return convert_onnx(model.path, calib, val, out / model.name, model.name, 1,
                        the_plan.gate, 1, settings=settings)


def _ort_defaults(model, work: Path, calib) -> dict[str, Path | str]:
    """What a user gets from onnxruntime's documented defaults (or the error they see)."""
    from onnxruntime.quantization import quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from edgeship.converter.graph import scratch_cwd
    from edgeship.converter.quantize import SamplesCalibrationReader

    out: dict[str, Path | str] = {}
    with scratch_cwd():
        try:
            pre = work / f"{model.name}-pre.onnx"
            quant_pre_process(str(model.path), str(pre))
            quantize_static(str(pre), str(work / f"{model.name}-ort-static.onnx"),
                            SamplesCalibrationReader(calib))
            out["ort static"] = work / f"{model.name}-ort-static.onnx"
        except Exception as e:  # noqa: BLE001 - the failure is the result
            out["ort static"] = f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"
        try:
            quantize_dynamic(str(model.path), str(work / f"{model.name}-ort-dynamic.onnx"))
            out["ort dynamic"] = work / f"{model.name}-ort-dynamic.onnx"
        except Exception as e:  # noqa: BLE001
            out["ort dynamic"] = f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"
    return out


def _quality(path: Path, val, reference) -> float:
    from edgeship.converter.evaluate import EvalSettings, evaluate

    metrics, _ = evaluate(path, val, reference, EvalSettings(threads=1), timed=False)
    if QUALITY.get(reference.task) == "agreement" and metrics.agreement is not None:
        return metrics.agreement
    return metrics.cosine


def _model_rows(name: str, builder, work: Path) -> list[dict]:
    from bench.converter import _p50s_interleaved, _session
    from edgeship.converter.evaluate import make_reference
    from edgeship.converter.graph import io_info
    from edgeship.converter.samples import RawData, load_npz_arrays

    model = builder(work / name)
    result = _convert(model, work / "bundles")
    inputs, _ = io_info(model.path)
    val = RawData(*load_npz_arrays(model.val)).match(inputs)
    calib = RawData(*load_npz_arrays(model.data)).match(inputs)
    reference = make_reference(model.path, val, result.task, threads=1)
    shipped = {v.id: result.bundle_dir / v.file for v in result.manifest.variants}
    ours = next((vid for vid in ("onnx-int8", "onnx-int8-dynamic") if vid in shipped), None)
    candidates: dict[str, Path | str] = {"fp32": model.path}
    if ours:
        candidates[f"ours ({ours})"] = shipped[ours]
    candidates.update(_ort_defaults(model, work, calib))
    paths = {k: v for k, v in candidates.items() if isinstance(v, Path)}
    sessions = {k: _session(p) for k, p in paths.items()}
    feed = val.feed(0)
    p50s = dict(zip(sessions, _p50s_interleaved([lambda s=s: s.run(None, feed)
                                                 for s in sessions.values()], RUNS)))
    passed = ",".join(r.id.replace("onnx-", "") for r in result.reports if r.passed)
    rows = []
    for label, value in candidates.items():
        row = {"model": name, "task": result.task, "variant": label, "passed": passed,
               "metric": QUALITY.get(result.task, "min cosine")}
        if isinstance(value, str):
            row["error"] = value
        else:
            row.update(size_bytes=value.stat().st_size, p50_ms=p50s[label],
                       quality=_quality(value, val, reference))
        rows.append(row)
    return rows


def _print(rows: list[dict]) -> None:
    print(f"load average: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cores; "
          "latency: single sample, 1 thread, p50; quality vs the fp32 source on --val")
    head = (f"{'model':<8} {'task':<14} {'variant':<28} {'size KiB':>9} {'×fp32':>6} "
            f"{'p50 ms':>8} {'×fp32':>6} {'quality':>16}  passed (rpi4 path)")
    print(head)
    print("-" * len(head))
    base: dict[str, dict] = {}
    for r in rows:
        if r["variant"] == "fp32":
            base[r["model"]] = r
        b = base[r["model"]]
        if "error" in r:
            print(f"{r['model']:<8} {r['task']:<14} {r['variant']:<28} failed: {r['error']}")
            continue
        print(f"{r['model']:<8} {r['task']:<14} {r['variant']:<28} "
              f"{r['size_bytes'] / 1024:>9.1f} {r['size_bytes'] / b['size_bytes']:>6.3f} "
              f"{r['p50_ms']:>8.3f} {r['p50_ms'] / b['p50_ms']:>6.2f} "
              f"{r['quality']:>8.4f} {r['metric']:<8}  "
              f"{r['passed'] if r['variant'] == 'fp32' else ''}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench-converter --zoo", description=__doc__)
    parser.add_argument("--only", default=None, help="comma-separated zoo model names")
    parser.add_argument("--small", action="store_true", help="the test-size detector")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore")
    from edgeship.converter.cli import _quiet_foreign_noise

    _quiet_foreign_noise()
    wanted = set(args.only.split(",")) if args.only else None
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-zoo-") as tmp:
        for name, builder in _builders(full=not args.small):
            if wanted is None or name in wanted:
                rows += _model_rows(name, builder, Path(tmp))
    print(json.dumps(rows, indent=2, default=str)) if args.json else _print(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
