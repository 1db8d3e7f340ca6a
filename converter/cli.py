"""``edgeship convert``: train/convert a model into a gated, packed bundle.

Exit codes: 0 bundle written, 1 conversion failed (e.g. no variant passed its gate),
2 bad input (bad option value, output already exists).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Sequence

from agent.errors import ConfigError, EdgeshipError
from agent.protocol import validate_id

logger = logging.getLogger(__name__)

SOURCES = ("digits",)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``convert`` subcommand on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "convert", help="convert a model into a gated bundle (fp32 + int8 ONNX)",
        description="Export a model to ONNX fp32, quantize it to static INT8, measure "
                    "both against the source model, drop variants that fail the gate and "
                    "write the rest as a bundle directory DIR/{name}-v{version} plus "
                    "DIR/{name}-v{version}.tar.")
    p.add_argument("source", choices=SOURCES,
                   help="what to convert: 'digits' trains the demo CNN on sklearn digits")
    p.add_argument("--out", type=Path, default=Path("bundles"), metavar="DIR",
                   help="parent directory of the bundle (default: %(default)s)")
    p.add_argument("--version", type=int, default=1, metavar="N",
                   help="model version, an integer >= 1 (default: %(default)s)")
    p.add_argument("--name", default=None, help="model name (default: the source name)")
    p.add_argument("--epochs", type=int, default=15, help="training epochs (digits)")
    p.add_argument("--seed", type=int, default=0, help="training/split seed (digits)")
    p.add_argument("--threads", type=int, default=2,
                   help="onnxruntime threads for latency measurement (default: 2)")
    p.add_argument("--max-drop", type=float, default=1.0, metavar="POINTS",
                   help="gate: largest accuracy drop in percentage points (default: 1.0)")
    p.add_argument("--min-agreement", type=float, default=0.97,
                   help="gate: smallest top-1 agreement with the source (default: 0.97)")
    p.add_argument("--min-cosine", type=float, default=0.99,
                   help="gate: smallest mean cosine similarity (default: 0.99)")
    p.add_argument("--max-size-kb", type=float, default=None, metavar="KB",
                   help="gate: largest variant file in KiB (default: no limit)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    p.add_argument("--no-tar", action="store_true", help="do not pack the bundle as .tar")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--verbose", action="store_true", help="show error details")
    p.set_defaults(func=run)
    return p


def _validate(args: argparse.Namespace) -> tuple[str, Path]:
    name = validate_id(args.name or args.source, "model name")
    if args.version < 1:
        raise ConfigError(f"--version must be >= 1, got {args.version}", key="version")
    if args.epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {args.epochs}", key="epochs")
    if args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}", key="threads")
    bundle_dir = args.out / f"{name}-v{args.version}"
    if bundle_dir.exists() and not args.overwrite:
        raise ConfigError(f"{bundle_dir} already exists (use --overwrite or another "
                          "--version)", key="out")
    return name, bundle_dir


def _kib(value: float | None) -> int | None:
    if value is None:
        return None
    if value <= 0:
        raise ConfigError(f"--max-size-kb must be > 0, got {value}", key="max_size_kb")
    return int(value * 1024)


def _quiet_foreign_noise() -> None:
    import torch  # noqa: F401 - torch configures its loggers on import; override after

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``edgeship convert``; returns the process exit code."""
    from converter.gates import Gate
    from converter.pipeline import ConvertSettings, convert_digits

    try:
        name, bundle_dir = _validate(args)
        gate = Gate(max_accuracy_drop_points=args.max_drop,
                    min_agreement=args.min_agreement, min_cosine=args.min_cosine,
                    max_size_bytes=_kib(args.max_size_kb))
    except EdgeshipError as e:
        return _fail(args, e, 2)
    _quiet_foreign_noise()
    try:
        result = convert_digits(
            bundle_dir, args.version, epochs=args.epochs, seed=args.seed,
            threads=args.threads, gate=gate, name=name, progress=not (args.quiet or args.json),
            settings=ConvertSettings(overwrite=args.overwrite))
        tar = None if args.no_tar else _pack(bundle_dir)
    except EdgeshipError as e:
        _print_reports(args, getattr(e, "reports", ()))
        return _fail(args, e, 1)
    _print_result(args, result, tar)
    return 0


def _pack(bundle_dir: Path) -> Path:
    from converter.bundle import pack_bundle

    return pack_bundle(bundle_dir)


def _fail(args: argparse.Namespace, error: EdgeshipError, code: int) -> int:
    if args.json:
        payload = {"ok": False, "error": str(error), "reason": str(error.reason_code)}
        if hasattr(error, "failures"):
            payload["failures"] = error.failures
        print(json.dumps(payload, indent=2))
    else:
        print(f"edgeship convert: error: {error}", file=sys.stderr)
    if args.verbose:
        logger.error("convert failed", exc_info=error)
    return code


def _print_result(args: argparse.Namespace, result, tar: Path | None) -> None:
    if args.json:
        payload = {"ok": True, **result.to_dict(), "tar": str(tar) if tar else None}
        print(json.dumps(payload, indent=2))
        return
    _print_reports(args, result.reports)
    print(f"bundle: {result.bundle_dir}")
    if tar is not None:
        print(f"tar:    {tar}")


def _print_reports(args: argparse.Namespace, reports: Sequence) -> None:
    if args.json or not reports:
        return
    rows = [_row(r) for r in reports]
    headers = ("variant", "precision", "size KB", "accuracy", "drop pt", "p50 ms",
               "p99 ms", "gate")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for row in (headers, *rows):
            print("  ".join(f"{c:>10}" for c in row))
        _print_failures(reports)
        return
    table = Table(title="variants")
    for h in headers:
        table.add_column(h, justify="left" if h in ("variant", "precision") else "right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    _print_failures(reports)


def _print_failures(reports: Sequence) -> None:
    for report in reports:
        for reason in report.failures:
            print(f"{report.id} not shipped: {reason}")


def _row(report) -> tuple[str, ...]:
    m = report.metrics
    gate = "PASS" if report.passed else "FAIL"
    return (report.id, report.precision, f"{m.size_bytes / 1024:.1f}",
            f"{m.accuracy * 100:.2f}%", f"{m.accuracy_drop:.2f}",
            f"{m.latency_p50_ms:.3f}", f"{m.latency_p99_ms:.3f}", gate)


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry: ``python -m converter.cli convert ...``."""
    parser = argparse.ArgumentParser(prog="edgeship")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())


add_parsers = add_parser  # the name edgeship/cli.py looks for
