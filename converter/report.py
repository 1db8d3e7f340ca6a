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
        rows.append({"id": r.id, "runtime": r.runtime, "precision": r.precision,
                     "shipped": r.id in shipped, "failures": list(r.failures),
                     "accuracy": m.accuracy, "accuracy_drop": m.accuracy_drop,
                     "agreement": m.agreement, "cosine": m.cosine,
                     "max_abs_diff": m.max_abs_diff, "p50_ms": m.latency_p50_ms,
                     "p99_ms": m.latency_p99_ms, "size_bytes": m.size_bytes,
                     "zstd_size_bytes": zstd, "memory_bytes": m.memory_bytes,
                     "notes": dict(r.notes)})
    return rows


def markdown(result, extra: dict | None = None) -> str:
    rows = _rows(result)
    lines = [f"# {result.manifest.model} v{result.manifest.version}", ""]
    if result.reference_accuracy is not None:
        lines.append(f"Source model accuracy: {result.reference_accuracy * 100:.2f}% "
                     f"on {int(result.manifest.reference.get('samples', 0))} samples.")
    else:
        lines.append("No labels: accuracy is top-1 agreement with the source model.")
    for k, v in (extra or {}).items():
        lines.append(f"- {k}: {v}")
    lines += ["", "![accuracy vs latency vs size](report.png)", "",
              "| variant | shipped | accuracy | drop pt | cosine | max abs | p50 ms | p99 ms "
              "| size KiB | zstd KiB | mem KiB | notes |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        zstd = f"{r['zstd_size_bytes'] / 1024:.1f}" if r["zstd_size_bytes"] else "-"
        note = "; ".join(r["failures"]) or ", ".join(
            f"{k}={v}" for k, v in r["notes"].items())
        lines.append(
            f"| {r['id']} | {'yes' if r['shipped'] else 'no'} | {r['accuracy'] * 100:.2f}% "
            f"| {r['accuracy_drop']:.2f} | {r['cosine']:.5f} | {r['max_abs_diff']:.4g} "
            f"| {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['size_bytes'] / 1024:.1f} "
            f"| {zstd} | {r['memory_bytes'] / 1024:.0f} | {note} |")
    return "\n".join(lines) + "\n"


def plot(result, path: Path) -> None:
    """Accuracy (y) vs p50 latency (x); marker area ∝ file size; failing variants as x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(result)
    biggest = max(r["size_bytes"] for r in rows)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for i, r in enumerate(sorted(rows, key=lambda r: r["p50_ms"])):
        area = 60 + 900 * r["size_bytes"] / biggest
        ax.scatter(r["p50_ms"], r["accuracy"] * 100, s=area, alpha=0.6,
                   marker="o" if r["shipped"] else "X",
                   color="tab:blue" if r["runtime"] == "onnxruntime" else "tab:orange")
        ax.annotate(f"{r['id']}\n{r['size_bytes'] / 1024:.0f} KiB",
                    (r["p50_ms"], r["accuracy"] * 100), fontsize=7,
                    xytext=(8, 18 - 14 * (i % 4)), textcoords="offset points",
                    arrowprops={"arrowstyle": "-", "alpha": 0.3})
    ax.set_xscale("log")
    ax.set_xlabel("p50 latency, ms (single sample, log scale)")
    ax.set_ylabel("top-1 accuracy, %" if result.reference_accuracy is not None
                  else "top-1 agreement with source, %")
    ax.set_title(f"{result.manifest.model} v{result.manifest.version}: blue ONNX, orange "
                 "TFLite; area = size; X = failed gate", fontsize=9)
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
