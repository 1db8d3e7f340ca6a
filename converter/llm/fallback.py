"""Accuracy-aware weight quantization for language models.

Quantize every weight to the target bit width; if the gate fails, rank groups of weights
(one group per decoder layer, the embedding, the LM head) by the KL divergence each causes
when it alone is quantized, and keep the most harmful groups at the next precision up
(int4 → int8, int8 → fp32) one at a time until the gate passes — as NNCF's
``quantize_with_accuracy_control`` and the CNN path's int8 fallback do.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from typing import Callable

from edgeship.converter.llm import export

logger = logging.getLogger(__name__)

Evaluate = Callable[[object], dict[str, float]]  # ModelProto -> metrics
GateCheck = Callable[[dict[str, float]], list[str]]
_LAYER = re.compile(r"/layers\.(\d+)/")


@dataclass
class FallbackResult:
    model: object
    metrics: dict[str, float]
    failures: list[str]
    kept: list[str] = field(default_factory=list)  # groups kept at higher precision
    harm: dict[str, float] = field(default_factory=dict)  # group -> KL alone


def group_of(node: str) -> str:
    m = _LAYER.search(node)
    if m:
        return f"layer.{int(m.group(1))}"
    if "embed" in node:
        return "embed_tokens"
    if "lm_head" in node:
        return "lm_head"
    return "other"


def groups(nodes: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n in nodes:
        out.setdefault(group_of(n), []).append(n)
    return out


def copy(model):
    clone = type(model)()
    clone.CopyFrom(model)
    return clone


def _base(fp32, spec: export.QuantSpec):
    clone = copy(fp32)
    return export.untie_embedding(clone) if spec.embeddings else clone


def mixed(fp32, spec: export.QuantSpec, high: list[str]):
    """``spec.bits`` for every weight node except ``high``, which get the next precision up
    (int8 for an int4 variant, fp32 for the embedding table and for an int8 variant)."""
    low = export.quantize(_base(fp32, spec), spec, exclude=tuple(high))
    if spec.bits < 8 and high:
        low = export.quantize(low, replace(spec, bits=8, embeddings=False), include=tuple(high))
    return low


def quantize_with_fallback(fp32, spec: export.QuantSpec, evaluate: Evaluate,
                           gate: GateCheck, enabled: bool = True) -> FallbackResult:
    model = mixed(fp32, spec, [])
    metrics = evaluate(model)
    failures = gate(metrics)
    if not failures or not enabled:
        return FallbackResult(model, metrics, failures)
    by_group = groups(export.quantizable_nodes(_base(fp32, spec), spec.embeddings))
    harm = {}
    for name, nodes in by_group.items():
        alone = export.quantize(_base(fp32, spec), spec, include=tuple(nodes))
        harm[name] = evaluate(alone)["mean_kl"]
    ranked = sorted(harm, key=harm.get, reverse=True)
    logger.info("int%d: gate failed (%s); harm by group: %s", spec.bits, "; ".join(failures),
                ", ".join(f"{g}={harm[g]:.4f}" for g in ranked))
    kept: list[str] = []
    for name in ranked:
        kept.append(name)
        high = [n for g in kept for n in by_group[g]]
        model = mixed(fp32, spec, high)
        metrics = evaluate(model)
        failures = gate(metrics)
        if not failures:
            break
    return FallbackResult(model, metrics, failures, kept, harm)
