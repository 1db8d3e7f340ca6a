"""``edgeship convert llm``: a decoder-only language model → gated ONNX variants → bundle.

checkpoint (or factory) → fp32 graph with KV cache (onnxruntime-genai's builder) → checked
against the PyTorch model → fp16 / int8 / int4 weight variants (accuracy-aware fallback) →
each measured on held-out text against fp32 (perplexity, top-1 agreement, KL) and gated →
memory need per variant (weights + KV cache at the full context) → bundle.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeship.agent.llm.spec import LlmSpec, memory_need_mb
from edgeship.converter.errors import ExportError, InputError, NoVariantPassedError
from edgeship.converter.llm import export
from edgeship.converter.llm.evaluate import LmGate, LogitsRunner, Reference, compare, windows
from edgeship.converter.llm.fallback import quantize_with_fallback

logger = logging.getLogger(__name__)

VARIANTS = ("onnx-fp32", "onnx-fp16", "onnx-int8", "onnx-int4")
PRECISION = {"onnx-fp32": "fp32", "onnx-fp16": "fp16", "onnx-int8": "int8", "onnx-int4": "int4"}
GOLDEN_PROMPT_TOKENS = 16


@dataclass(frozen=True)
class LlmSettings:
    variants: tuple[str, ...] = VARIANTS
    block_size: int = 32
    algorithm: str = "rtn"
    accuracy_level: int = 4
    quantize_embeddings: bool = True
    gate: LmGate = LmGate()
    fallback: bool = True
    eval_windows: int = 16
    eval_seq_len: int = 128
    max_sequences: int = 1
    golden_top_k: int = 5
    overwrite: bool = False


@dataclass
class LlmVariantReport:
    id: str
    precision: str
    metrics: dict[str, float]
    failures: list[str]
    kept_higher: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {"id": self.id, "precision": self.precision, "metrics": self.metrics,
                "failures": self.failures, "kept_higher_precision": self.kept_higher,
                "passed": self.passed}


@dataclass
class LlmResult:
    bundle_dir: Path
    reports: list[LlmVariantReport]
    spec: LlmSpec
    export_check: dict[str, float]

    @property
    def shipped(self) -> tuple[str, ...]:
        return tuple(r.id for r in self.reports if r.passed)

    def to_dict(self) -> dict:
        return {"bundle": str(self.bundle_dir), "shipped": list(self.shipped),
                "variants": [r.to_dict() for r in self.reports], "llm": self.spec.to_dict(),
                "export_check": self.export_check}


def read_heldout(checkpoint: Path, heldout: str | Path | None) -> str:
    path = Path(heldout) if heldout else checkpoint / "heldout.txt"
    if not path.is_file():
        raise InputError(f"held-out text {path} not found: pass --heldout FILE (plain text "
                         "the model was not trained on)", key="heldout")
    return path.read_text(errors="replace")


def llm_spec(builder_dir: Path, settings: LlmSettings, chat: bool) -> LlmSpec:
    cfg = json.loads((builder_dir / "genai_config.json").read_text())["model"]
    dec = cfg["decoder"]
    eos = cfg.get("eos_token_id", [])
    return LlmSpec(context_length=int(cfg["context_length"]), vocab_size=int(cfg["vocab_size"]),
                   layers=int(dec["num_hidden_layers"]), kv_heads=int(dec["num_key_value_heads"]),
                   head_dim=int(dec["head_size"]),
                   eos_token_ids=tuple(eos if isinstance(eos, list) else [eos]),
                   chat_template=chat, golden_top_k=settings.golden_top_k,
                   max_sequences=settings.max_sequences)


def check_export(checkpoint: Path, runner: LogitsRunner, window: np.ndarray) -> dict[str, float]:
    """The fp32 graph's logits against the PyTorch model's on one window."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(window[None].astype(np.int64))).logits[0].numpy()
    got = runner.logits(window)
    diff = float(np.max(np.abs(ref - got)))
    if not diff < 1e-2 * max(1.0, float(np.abs(ref).max())):
        raise ExportError(f"exported fp32 graph differs from the PyTorch model by {diff:.3g}")
    return {"max_abs_diff": diff, "top1_agreement": float((ref.argmax(-1) ==
                                                           got.argmax(-1)).mean())}


def _tokenize(checkpoint: Path, text: str) -> np.ndarray:
    from transformers import AutoTokenizer

    return np.asarray(AutoTokenizer.from_pretrained(checkpoint)(text)["input_ids"], np.int64)


def _variant_model(vid: str, fp32, settings: LlmSettings, ref: Reference):
    """(model, metrics, failures, kept) for one variant id."""
    gate = settings.gate.check

    def evaluate(model) -> dict[str, float]:
        return compare(LogitsRunner(model, ref.head_dim), ref)

    if vid == "onnx-fp32":
        m = evaluate(fp32)
        return fp32, m, gate(m), []
    if vid == "onnx-fp16":
        model = export.fp16_weights(_clone(fp32))
        m = evaluate(model)
        return model, m, gate(m), []
    bits = 4 if vid == "onnx-int4" else 8
    spec = export.QuantSpec(bits=bits, block_size=settings.block_size,
                            algorithm=settings.algorithm if bits == 4 else "rtn",
                            accuracy_level=settings.accuracy_level,
                            embeddings=settings.quantize_embeddings and bits == 4)
    result = quantize_with_fallback(fp32, spec, evaluate, gate, settings.fallback)
    metrics = dict(result.metrics, block_size=float(settings.block_size),
                   kept_higher=float(len(result.kept)))
    return result.model, metrics, result.failures, result.kept


def _clone(model):
    clone = type(model)()
    clone.CopyFrom(model)
    return clone


def convert_llm(source: str, out_dir: str | Path, name: str, version: int = 1, *,
                heldout: str | Path | None = None,
                settings: LlmSettings = LlmSettings()) -> LlmResult:
    from edgeship.converter.llm.bundle import LlmArtifact, write_llm_bundle

    unknown = [v for v in settings.variants if v not in VARIANTS]
    if unknown:
        raise InputError(f"unknown language-model variants {unknown} (choose from "
                         f"{', '.join(VARIANTS)})", key="variants")
    with tempfile.TemporaryDirectory(prefix="edgeship-llm-") as tmp:
        work = Path(tmp)
        checkpoint = export.load_source(source, work)
        export.architecture(checkpoint)
        text = read_heldout(checkpoint, heldout)
        start = time.perf_counter()
        builder_dir = work / "fp32"
        export.build_fp32(checkpoint, builder_dir, work / "cache")
        build_s = time.perf_counter() - start
        assets = export.assets(builder_dir, checkpoint)
        spec = llm_spec(builder_dir, settings, chat=_has_chat_template(assets))
        fp32 = export.load(builder_dir / "model.onnx")
        runner = LogitsRunner(fp32, spec.head_dim)
        wins = windows(_tokenize(checkpoint, text), settings.eval_seq_len, settings.eval_windows)
        checked = dict(check_export(checkpoint, runner, wins[0][:-1]), build_s=build_s)
        ref = Reference.measure(runner, wins, spec.head_dim)
        golden_ids = wins[0][:GOLDEN_PROMPT_TOKENS]
        reports, artifacts = [], []
        for vid in settings.variants:
            model, metrics, failures, kept = _variant_model(vid, fp32, settings, ref)
            path = export.save_single(model, work / "variants" / f"{vid}.onnx", assets)
            metrics.update(weights_mb=export.weights_mb(model), file_bytes=path.stat().st_size)
            metrics["memory_mb"] = memory_need_mb(spec, metrics["weights_mb"])
            reports.append(LlmVariantReport(vid, PRECISION[vid], metrics, failures, kept))
            if not failures:
                artifacts.append(LlmArtifact(vid, PRECISION[vid], path, metrics))
            logger.info("%s: %s", vid, "pass" if not failures else "; ".join(failures))
        if not artifacts:
            raise NoVariantPassedError("no language-model variant passed its gate",
                                       failures={r.id: r.failures for r in reports},
                                       reports=tuple(reports))
        bundle = write_llm_bundle(out_dir, name, version, artifacts, golden_ids, spec,
                                  reference={"perplexity": ref_perplexity(ref)},
                                  overwrite=settings.overwrite)
    return LlmResult(bundle, reports, spec, checked)


def ref_perplexity(ref: Reference) -> float:
    nll = sum(-float(lp[np.arange(len(w) - 1), w[1:]].sum()) for w, lp in
              zip(ref.windows, ref.logp))
    return float(np.exp(nll / sum(len(w) - 1 for w in ref.windows)))


def _has_chat_template(assets: dict[str, str]) -> bool:
    if "chat_template.jinja" in assets:
        return True
    try:
        return bool(json.loads(assets.get("tokenizer_config.json", "{}")).get("chat_template"))
    except json.JSONDecodeError:
        return False


def report_rows(reports: Sequence[LlmVariantReport]) -> list[tuple[str, ...]]:
    rows = []
    for r in reports:
        m = r.metrics
        rows.append((r.id, f"{m['file_bytes'] / 1024 ** 2:.2f}", f"{m['perplexity']:.3f}",
                     f"{m['ppl_increase'] * 100:+.2f}%", f"{m['top1_agreement']:.4f}",
                     f"{m['mean_kl']:.5f}", f"{m['memory_mb']:.0f}",
                     ",".join(r.kept_higher) or "-", "PASS" if r.passed else "FAIL"))
    return rows
