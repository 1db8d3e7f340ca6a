"""The conversion report: ``report.json``, ``report.md`` and ``report.png`` (accuracy vs
latency, marker area ∝ size) for every variant, shipped or not.

Written to a temporary directory and moved into place, like the bundle.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)


def _rows(result) -> list[dict]:
    shipped = {v.id: v for v in result.manifest.variants}
    rows = []
    for r in result.reports:
        m = r.metrics
        zstd = shipped[r.id].metrics.get("zstd_size_bytes") if r.id in shipped else None
        row = {"id": r.id, "runtime": r.runtime, "precision": r.precision,
               "shipped": r.id in shipped, "failures": r.failure_lines(),
               "reasons": r.reasons(), "notes": dict(r.notes), "zstd_size_bytes": zstd}
        if m is not None:
            row.update({"accuracy": m.accuracy, "accuracy_drop": m.accuracy_drop,
                        "agreement": m.agreement, "cosine": m.cosine,
                        "snr_db": m.snr_db, "max_abs_diff": m.max_abs_diff,
                        "p50_ms": m.latency_p50_ms, "p99_ms": m.latency_p99_ms,
                        "size_bytes": m.size_bytes, "memory_bytes": m.memory_bytes,
                        "outputs": [o.to_dict() for o in m.outputs]})
        rows.append(row)
    return rows


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def markdown(result, extra: dict | None = None) -> str:
    rows = _rows(result)
    lines = [f"# {result.manifest.model} v{result.manifest.version}", "",
             f"Task: {result.task}."]
    if not result.accuracy_measured:
        lines.append("Accuracy was not measured: no data was given; every variant was "
                     "compared with the source model on synthesized inputs.")
    elif result.reference_accuracy is not None:
        lines.append(f"Source model accuracy: {result.reference_accuracy * 100:.2f}% "
                     f"on {int(result.manifest.reference.get('samples', 0))} samples.")
    else:
        lines.append("No labels: every output is compared with the source model's.")
    lines += [f"- warning: {w}" for w in result.warnings]
    for k, v in (extra or {}).items():
        lines.append(f"- {k}: {v}")
    lines += ["", "![accuracy vs latency vs size](report.png)", "",
              "| variant | shipped | accuracy | drop pt | agreement | cosine | SNR dB "
              "| max abs | p50 ms | p99 ms | size KiB | zstd KiB | mem KiB | notes |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = "; ".join(r["failures"]) or ", ".join(
            f"{k}={v}" for k, v in r["notes"].items() if k != "fallbacks")
        lines.append(
            f"| {r['id']} | {'yes' if r['shipped'] else 'no'} "
            f"| {_fmt(r.get('accuracy'), '.2%')} | {_fmt(r.get('accuracy_drop'), '.2f')} "
            f"| {_fmt(r.get('agreement'), '.4f')} | {_fmt(r.get('cosine'), '.5f')} "
            f"| {_fmt(r.get('snr_db'), '.1f')} | {_fmt(r.get('max_abs_diff'), '.4g')} "
            f"| {_fmt(r.get('p50_ms'), '.3f')} | {_fmt(r.get('p99_ms'), '.3f')} "
            f"| {_fmt(r.get('size_bytes'), '.1f', 1 / 1024)} "
            f"| {_fmt(r['zstd_size_bytes'], '.1f', 1 / 1024)} "
            f"| {_fmt(r.get('memory_bytes'), '.0f', 1 / 1024)} | {note} |")
    lines += _output_table(rows)
    return "\n".join(lines) + "\n"


def _output_table(rows: list[dict]) -> list[str]:
    lines = ["", "Every output, per variant:", "",
             "| variant | output | shape | cosine | min cosine | SNR dB | max abs | "
             "agreement |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for o in r.get("outputs", []):
            lines.append(f"| {r['id']} | {o['name']} | {'ok' if o['shape_ok'] else 'DIFFERS'}"
                         f" | {o['cosine']:.5f} | {o['cosine_min']:.5f} | {o['snr_db']:.1f}"
                         f" | {o['max_abs_diff']:.4g} | {_fmt(o.get('agreement'), '.4f')} |")
    return lines


def _quality(r: dict, result) -> float:
    if r.get("accuracy") is not None:
        return r["accuracy"] * 100
    if r.get("agreement") is not None:
        return r["agreement"] * 100
    return r.get("cosine", 0.0) * 100


def plot(result, path: Path) -> None:
    """Quality (y) vs p50 latency (x); marker area ∝ file size; failing variants as x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in _rows(result) if "p50_ms" in r]
    biggest = max((r["size_bytes"] for r in rows), default=1)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for i, r in enumerate(sorted(rows, key=lambda r: r["p50_ms"])):
        area = 60 + 900 * r["size_bytes"] / biggest
        y = _quality(r, result)
        ax.scatter(max(r["p50_ms"], 1e-4), y, s=area, alpha=0.6,
                   marker="o" if r["shipped"] else "X",
                   color="tab:blue" if r["runtime"] == "onnxruntime" else "tab:orange")
        ax.annotate(f"{r['id']}\n{r['size_bytes'] / 1024:.0f} KiB",
                    (max(r["p50_ms"], 1e-4), y), fontsize=7,
                    xytext=(8, 18 - 14 * (i % 4)), textcoords="offset points",
                    arrowprops={"arrowstyle": "-", "alpha": 0.3})
    ax.set_xscale("log")
    ax.set_xlabel("p50 latency, ms (single sample, log scale)")
    ax.set_ylabel("top-1 accuracy, %" if result.reference_accuracy is not None
                  else "agreement (or cosine) with the source, %")
    ax.set_title(f"{result.manifest.model} v{result.manifest.version} ({result.task}): blue "
                 "ONNX, orange TFLite; area = size; X = failed gate", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(result, out_dir: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write the report directory atomically; returns its path."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        payload = {**result.to_dict(), "extra": dict(extra or {}), "rows": _rows(result)}
        (tmp / "report.json").write_text(json.dumps(payload, indent=2, default=str))
        (tmp / "report.md").write_text(markdown(result, extra))
        try:
            plot(result, tmp / "report.png")
        except ImportError:
            logger.warning("matplotlib is not installed: report without a plot")
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
