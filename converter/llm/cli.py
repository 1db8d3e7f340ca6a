"""``edgeship convert llm CHECKPOINT_DIR|module:factory``: the language-model path of
``edgeship convert`` (options below are added to that command; the shared ones — ``--out``,
``--name``, ``--version``, ``--variants``, ``--device``, ``--no-fallback``,
``--min-agreement``, ``--overwrite``, ``--json``, ``--no-tar`` — mean what they mean there)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgeship.agent.errors import ConfigError, EdgeshipError

HEADERS = ("variant", "MB", "perplexity", "Δppl", "top-1", "KL", "mem MB", "kept higher",
           "gate")


def add_llm_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("language models (source 'llm')")
    g.add_argument("--heldout", default=None, metavar="TEXT",
                   help="held-out plain text for the gates (default: CHECKPOINT/heldout.txt)")
    g.add_argument("--block-size", type=int, default=32, choices=(16, 32, 64, 128, 256),
                   help="int4/int8 block size (default: %(default)s)")
    g.add_argument("--int4-algo", default="rtn", choices=("rtn", "hqq", "k_quant"),
                   help="int4 weight quantizer (default: %(default)s)")
    g.add_argument("--accuracy-level", type=int, default=4, choices=(0, 1, 2, 3, 4),
                   help="MatMulNBits compute type: 4 = int8 activations (fast on CPU), "
                        "1 = fp32 (default: %(default)s)")
    g.add_argument("--float-embeddings", action="store_true",
                   help="keep the embedding table in float in the int4 variant")
    g.add_argument("--max-ppl-increase", type=float, default=None, metavar="FRACTION",
                   help="gate: largest relative perplexity increase (default: 0.05)")
    g.add_argument("--max-kl", type=float, default=None,
                   help="gate: largest mean KL divergence in nats (default: 0.05)")
    g.add_argument("--eval-windows", type=int, default=16,
                   help="held-out windows of --eval-tokens tokens (default: %(default)s)")
    g.add_argument("--eval-tokens", type=int, default=128, help="tokens per window")


def _settings(args: argparse.Namespace):
    from edgeship.converter.llm.evaluate import LmGate
    from edgeship.converter.llm.pipeline import VARIANTS, LlmSettings

    gate = LmGate(
        max_ppl_increase=0.05 if args.max_ppl_increase is None else args.max_ppl_increase,
        min_top1_agreement=0.90 if args.min_agreement is None else args.min_agreement,
        max_mean_kl=0.05 if args.max_kl is None else args.max_kl)
    variants = VARIANTS if args.variants in (None, "all") else tuple(
        v.strip() for v in args.variants.split(",") if v.strip())
    if args.eval_windows < 1 or args.eval_tokens < 8:
        raise ConfigError("--eval-windows must be >= 1 and --eval-tokens >= 8",
                          key="eval_windows")
    return LlmSettings(variants=variants, block_size=args.block_size,
                       algorithm=args.int4_algo, accuracy_level=args.accuracy_level,
                       quantize_embeddings=not args.float_embeddings, gate=gate,
                       fallback=args.fallback is not False, eval_windows=args.eval_windows,
                       eval_seq_len=args.eval_tokens, overwrite=args.overwrite)


def _device_check(args: argparse.Namespace, result) -> list[str]:
    """With ``--device``: which shipped variants fit that board's memory budget."""
    if not args.device:
        return []
    from edgeship import devices
    from edgeship.agent.llm.spec import MemoryBudgetError, check_fits

    budget = devices.load_profile(args.device).model_memory_budget_mb
    notes = []
    for r in result.reports:
        if r.passed:
            try:
                check_fits(r.id, result.spec, r.metrics, budget, where=args.device)
            except MemoryBudgetError as e:
                notes.append(f"{r.id} does not fit {args.device}: {e}")
    return notes


def run(args: argparse.Namespace, name: str, bundle_dir: Path) -> int:
    """Convert, pack and print; the caller has validated name, version and output."""
    try:
        settings = _settings(args)
        from edgeship.converter.llm.pipeline import convert_llm
        result = convert_llm(args.model, bundle_dir, name, args.version,
                             heldout=args.heldout, settings=settings)
        tar, zst = (None, None) if args.no_tar else _pack(bundle_dir, args.overwrite)
    except ConfigError as e:
        return _fail(args, e, 2)
    except EdgeshipError as e:
        _print(args, getattr(e, "reports", ()), None, None, [])
        code = 2 if type(e).__name__ in ("InputError", "ExportError") else 1
        return _fail(args, e, code)
    _print(args, result.reports, result, tar, _device_check(args, result))
    return 0


def _pack(bundle_dir: Path, overwrite: bool) -> tuple[Path, Path]:
    from edgeship.converter.bundle import pack_bundle
    from edgeship.converter.compression import compress_file

    tar = pack_bundle(bundle_dir)
    return tar, compress_file(tar)


def _fail(args: argparse.Namespace, error: EdgeshipError, code: int) -> int:
    if args.json:
        print(json.dumps({"ok": False, "error": str(error), "reason": str(error.reason_code),
                          "failures": getattr(error, "failures", {})}, indent=2))
    else:
        print(f"edgeship convert: error: {error}", file=sys.stderr)
    return code


def _print(args, reports, result, tar: Path | None, notes: list[str]) -> None:
    from edgeship.converter.llm.pipeline import report_rows

    if args.json:
        if result is not None:
            print(json.dumps({"ok": True, **result.to_dict(), "tar": str(tar) if tar else None,
                              "notes": notes}, indent=2))
        return
    rows = [HEADERS, *report_rows(reports)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADERS))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    for r in reports:
        for reason in r.failures:
            print(f"{r.id} not shipped: {reason}", file=sys.stderr)
    for note in notes:
        print(note)
    if result is not None:
        print(f"bundle: {result.bundle_dir}")
        if tar is not None:
            print(f"tar:    {tar}")
