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

from edgeship.agent.errors import ConfigError, EdgeshipError
from edgeship.agent.protocol import validate_id
from edgeship.cliutil import error_line

logger = logging.getLogger(__name__)

#: what each source's parser lacks gets these values, so the pipeline sees one namespace
_DEFAULTS = {"model": None, "weights": None, "input_shape": None, "calib": None, "val": None,
             "resize": None, "layout": None, "mean": None, "std": None, "grayscale": None,
             "prune_sparsity": None, "prune_channels": None, "student": None,
             "finetune_epochs": None, "temperature": None, "alpha": None, "epochs": 15,
             "seed": 0}
_SOURCE_HELP = {
    "digits": ("train the demo CNN on scikit-learn's digits, then convert it",
               "  edgeship convert digits --device rpi4"),
    "onnx": ("an ONNX file (external data next to it is fine): ONNX variants only",
             "  edgeship convert onnx model.onnx --calib calib.npz --val val.npz"),
    "torch": ("package.module:factory (+ --weights), a TorchScript file or a .pt2: ONNX "
              "and TFLite variants, pruning, distillation",
              "  edgeship convert torch pkg.mod:make_model --weights w.safetensors "
              "--input-shape 1,3,32,32 --calib imgs/ --val val.npz\n"
              "  edgeship convert torch model.pt2 --recipe recipe.toml"),
    "llm": ("a decoder-only language model: a Hugging Face checkpoint directory or "
            "module:factory returning (model, tokenizer); int4/int8 for onnxruntime-genai",
            "  edgeship convert llm ./my-llama --heldout valid.txt --device rpi5"),
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``convert {digits,onnx,torch,llm}`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "convert", help="convert a model into gated variants (ONNX fp32/fp16/int8, TFLite)",
        description="Make ONNX (fp32 optimized, fp16, int8 dynamic, int8 static with "
                    "accuracy-aware fallback) and, from PyTorch, TFLite variants; measure "
                    "each against the source model; drop variants that fail the gate; write "
                    "DIR/{name}-v{version} (bundle), .tar, .tar.zst and .report/ "
                    "(JSON, Markdown, PNG). 'edgeship convert SOURCE --help' for each source.",
        epilog="examples:\n" + "\n".join(ex for _, ex in _SOURCE_HELP.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sources = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    common, data, shrink = _common_options(), _data_options(), _shrink_options()
    parents = {"digits": [common, shrink], "onnx": [common, data],
               "torch": [common, data, shrink], "llm": [common]}
    for source, (help_text, example) in _SOURCE_HELP.items():
        s = sources.add_parser(source, parents=parents[source], help=help_text,
                               description=help_text, epilog="example:\n" + example,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        _source_options(s, source)
        own = {a.dest for a in s._actions}
        s.set_defaults(func=run, **{k: v for k, v in _DEFAULTS.items() if k not in own})
    return p


def _source_options(s: argparse.ArgumentParser, source: str) -> None:
    if source == "digits":
        s.add_argument("--epochs", type=int, default=15, help="training epochs")
        s.add_argument("--seed", type=int, default=0, help="training/split seed")
    elif source == "onnx":
        s.add_argument("model", metavar="MODEL.onnx", help="the ONNX file")
    elif source == "llm":
        s.add_argument("model", metavar="MODEL",
                       help="a Hugging Face checkpoint directory or module:factory")
        from edgeship.converter.llm.cli import add_llm_options
        add_llm_options(s)
    else:
        s.add_argument("model", metavar="MODEL",
                       help="package.module:factory, a TorchScript file or a .pt2")
        s.add_argument("--weights", default=None, help="state_dict (.pt) or .safetensors")
        s.add_argument("--input-shape", default=None, metavar="N,C,H,W",
                       help="example input shape")


def _data_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("data")
    g.add_argument("--calib", default=None, metavar="DATA",
                   help=".npy/.npz (x[, y]), an image folder or package.module:callable")
    g.add_argument("--val", default=None, metavar="DATA",
                   help="validation data (same forms; labels y optional)")
    g.add_argument("--resize", default=None, metavar="H,W", help="image folders: resize")
    g.add_argument("--layout", default=None, choices=("NCHW", "NHWC"))
    g.add_argument("--mean", default=None, help="image folders: per-channel mean, 0..1")
    g.add_argument("--std", default=None, help="image folders: per-channel std, 0..1")
    g.add_argument("--grayscale", action="store_true", default=None)
    return p


def _shrink_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("pruning and distillation (PyTorch)")
    g.add_argument("--prune-sparsity", type=float, default=None, metavar="S",
                   help="unstructured magnitude pruning to sparsity S (0..1) before export")
    g.add_argument("--prune-channels", type=float, default=None, metavar="R",
                   help="remove fraction R of channels (torch-pruning) before export")
    g.add_argument("--student", default=None, metavar="PKG.MOD:FACTORY",
                   help="distil this smaller model from the source and convert it")
    g.add_argument("--finetune-epochs", type=int, default=None,
                   help="epochs of fine-tune/distillation on --calib data (default: 3)")
    g.add_argument("--temperature", type=float, default=None, help="distillation T")
    g.add_argument("--alpha", type=float, default=None,
                   help="distillation weight of the teacher's soft targets (0..1)")
    return p


def _common_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--recipe", type=Path, default=None, metavar="TOML",
                   help="options from a TOML recipe (flags given here win)")
    p.add_argument("--device", default=None, metavar="PROFILE",
                   help="board profile (e.g. rpi4): picks variants, threads and gates")
    p.add_argument("--variants", default=None,
                   help="comma-separated variant ids or 'all' (default: from --device, "
                        "else the ONNX ones; digits: onnx-fp32,onnx-int8)")
    p.add_argument("--calibration", default=None, help="minmax (default), entropy, "
                   "percentile")
    p.add_argument("--no-fallback", dest="fallback", action="store_false", default=None,
                   help="no accuracy-aware INT8 fallback")
    p.add_argument("--out", type=Path, default=Path("bundles"), metavar="DIR",
                   help="parent directory of the outputs (default: %(default)s)")
    p.add_argument("--version", type=int, default=None, metavar="N",
                   help="model version, an integer >= 1 (default: 1)")
    p.add_argument("--name", default=None, help="model name (default: from the source)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for latency (default: the profile's, else 2)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--no-tar", action="store_true", help="no .tar / .tar.zst")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    _add_gate_options(p)
    return p


def _add_gate_options(parser: argparse.ArgumentParser) -> None:
    p = parser.add_argument_group("gates")
    p.add_argument("--max-drop", type=float, default=None, metavar="POINTS",
                   help="gate: largest accuracy drop in points (default: profile or 1.0)")
    p.add_argument("--min-agreement", type=float, default=None,
                   help="gate: smallest top-1 agreement (default: profile or 0.97)")
    p.add_argument("--min-cosine", type=float, default=None,
                   help="gate: smallest mean cosine similarity (default: profile or 0.99)")
    p.add_argument("--max-size-kb", type=float, default=None, metavar="KB",
                   help="gate: largest variant file in KiB (default: no limit)")


def _apply_recipe(args: argparse.Namespace) -> None:
    from edgeship.converter.options import load_recipe

    if args.recipe is None:
        return
    for dest, value in load_recipe(args.recipe).items():
        if getattr(args, dest, None) is None:
            setattr(args, dest, value)


def _validate(args: argparse.Namespace) -> tuple[str, Path]:
    if args.source != "digits" and not args.model:
        raise ConfigError(f"'convert {args.source}' needs a model argument", key="model")
    if args.source in ("onnx", "torch") and Path(args.model).is_dir():
        wanted = "the .onnx file" if args.source == "onnx" else \
            "the TorchScript or .pt2 file (or package.module:factory)"
        raise ConfigError(f"{args.model} is a directory: give {wanted} inside it",
                          key="model")
    args.version = 1 if args.version is None else args.version
    name = validate_id(args.name or _default_name(args), "model name")
    if args.version < 1:
        raise ConfigError(f"--version must be >= 1, got {args.version}", key="version")
    if args.epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {args.epochs}", key="epochs")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}", key="threads")
    bundle_dir = args.out / f"{name}-v{args.version}"
    if bundle_dir.exists() and not args.overwrite:
        raise ConfigError(f"{bundle_dir} already exists (use --overwrite or another "
                          "--version)", key="out")
    return name, bundle_dir


def _default_name(args: argparse.Namespace) -> str:
    if args.source == "digits":
        return "digits"
    stem = str(args.model).rsplit(":", 1)[-1]
    stem = Path(stem).name.split(".")[0]
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in stem).lower() or "model"


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
    warnings.filterwarnings("ignore", category=UserWarning)


def _plan(args: argparse.Namespace):
    from edgeship.converter.options import check_calibration, parse_variants, plan
    from edgeship.converter.pipeline import DEFAULT_VARIANTS

    variants = parse_variants(args.variants)
    if variants is None and args.source == "digits" and args.device is None:
        variants = DEFAULT_VARIANTS
    check_calibration(args.calibration)
    return plan(device=args.device, variants=variants, threads=args.threads,
                gate_overrides={"max_accuracy_drop_points": args.max_drop,
                                "min_agreement": args.min_agreement,
                                "min_cosine": args.min_cosine,
                                "max_size_bytes": _kib(args.max_size_kb)},
                has_torch_source=args.source != "onnx")


def _settings(args: argparse.Namespace, the_plan):
    from edgeship.converter.accuracy_aware import FallbackSettings
    from edgeship.converter.pipeline import ConvertSettings
    from edgeship.converter.quantize import QuantizeSettings

    return ConvertSettings(
        gate=the_plan.gate, variants=the_plan.variants, overwrite=args.overwrite,
        quantize=QuantizeSettings(calibration_method=args.calibration or "minmax"),
        fallback=FallbackSettings(enabled=args.fallback is not False))


def run(args: argparse.Namespace) -> int:
    """Entry point of ``edgeship convert``; returns the process exit code."""
    from edgeship.converter.errors import ExportError, InputError

    try:
        _apply_recipe(args)
        name, bundle_dir = _validate(args)
        if args.source == "llm":  # decoder-only language model: converter/llm
            from edgeship.converter.llm.cli import run as run_llm
            _quiet_foreign_noise()
            return run_llm(args, name, bundle_dir)
        the_plan = _plan(args)
        settings = _settings(args, the_plan)
    except EdgeshipError as e:
        return _fail(args, e, 2)
    _quiet_foreign_noise()
    outputs = _output_paths(bundle_dir)
    try:
        result = _convert(args, name, bundle_dir, the_plan, settings)
        tar, zst = (None, None) if args.no_tar else _pack(bundle_dir, args.overwrite)
        report = _report(result, outputs["report"], the_plan)
    except (InputError, ExportError, ConfigError) as e:
        _cleanup(outputs, args.overwrite)
        return _fail(args, e, 2)
    except EdgeshipError as e:
        _cleanup(outputs, args.overwrite)
        _print_reports(args, getattr(e, "reports", ()))
        return _fail(args, e, 1)
    _print_result(args, result, tar, zst, report, the_plan)
    return 0


def _output_paths(bundle_dir: Path) -> dict[str, Path]:
    return {"bundle": bundle_dir, "tar": bundle_dir.with_name(bundle_dir.name + ".tar"),
            "zst": bundle_dir.with_name(bundle_dir.name + ".tar.zst"),
            "report": bundle_dir.with_name(bundle_dir.name + ".report")}


def _cleanup(outputs: dict[str, Path], overwrite: bool) -> None:
    """Remove what this run created before it failed (never a pre-existing output)."""
    import shutil

    if overwrite:
        return  # cannot tell ours from the old ones; the bundle itself is all-or-nothing
    for path in outputs.values():
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _convert(args: argparse.Namespace, name: str, bundle_dir: Path, the_plan, settings):
    from edgeship.converter.inputs import convert_from_args

    return convert_from_args(args, name, bundle_dir, the_plan, settings,
                             progress=not (args.quiet or args.json))


def _report(result, path: Path, the_plan) -> Path:
    from edgeship.converter.report import write_report

    extra = {"device": the_plan.device or "-", "threads": the_plan.threads}
    if the_plan.skipped:
        extra["skipped"] = (", ".join(the_plan.skipped) + ": TFLite needs the PyTorch "
                            "source")
    return write_report(result, path, extra)


def _pack(bundle_dir: Path, overwrite: bool) -> tuple[Path, Path]:
    from edgeship.converter.bundle import pack_bundle
    from edgeship.converter.compression import compress_file

    tar = pack_bundle(bundle_dir)
    return tar, compress_file(tar)


def _fail(args: argparse.Namespace, error: EdgeshipError, code: int) -> int:
    if args.json:
        payload = {"ok": False, "error": str(error), "reason": str(error.reason_code)}
        if hasattr(error, "failures"):
            payload["failures"] = error.failures
        print(json.dumps(payload, indent=2))
    else:
        error_line(error)
    if getattr(args, "verbose", False):
        logger.error("convert failed", exc_info=error)
    return code


def _print_result(args: argparse.Namespace, result, tar: Path | None, zst: Path | None,
                  report: Path, the_plan) -> None:
    sizes = {"tar_bytes": tar.stat().st_size if tar else None,
             "tar_zst_bytes": zst.stat().st_size if zst else None}
    if args.json:
        payload = {"ok": True, **result.to_dict(), "tar": str(tar) if tar else None,
                   "tar_zst": str(zst) if zst else None, **sizes, "report": str(report),
                   "device": the_plan.device, "threads": the_plan.threads,
                   "skipped": list(the_plan.skipped)}
        print(json.dumps(payload, indent=2))
        return
    _print_reports(args, result.reports)
    for vid in the_plan.skipped:
        print(f"{vid} skipped: TFLite needs the PyTorch source (litert-torch), not ONNX")
    print(f"bundle: {result.bundle_dir}")
    if tar is not None:
        print(f"tar:    {tar} ({sizes['tar_bytes'] / 1024:.1f} KiB)")
        print(f"zstd:   {zst} ({sizes['tar_zst_bytes'] / 1024:.1f} KiB)")
    print(f"report: {report / 'report.md'}")


def _print_reports(args: argparse.Namespace, reports: Sequence) -> None:
    if args.json or not reports:
        return
    rows = [_row(r) for r in reports]
    headers = ("variant", "precision", "size KB", "accuracy", "drop pt", "cosine",
               "p50 ms", "p99 ms", "gate")
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
    console = Console()
    if not console.is_terminal:
        console = Console(width=140)
    console.print(table)
    _print_failures(reports)


def _print_failures(reports: Sequence) -> None:
    for report in reports:
        for reason in report.failures:
            print(f"{report.id} not shipped: {reason}")


def _row(report) -> tuple[str, ...]:
    m = report.metrics
    gate = "PASS" if report.passed else "FAIL"
    return (report.id, report.precision, f"{m.size_bytes / 1024:.1f}",
            f"{m.accuracy * 100:.2f}%", f"{m.accuracy_drop:.2f}", f"{m.cosine:.5f}",
            f"{m.latency_p50_ms:.3f}", f"{m.latency_p99_ms:.3f}", gate)


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry: ``python -m converter.cli convert ...``."""
    parser = argparse.ArgumentParser(prog="edgeship")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False)
                        else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())


add_parsers = add_parser  # the name edgeship/cli.py looks for
