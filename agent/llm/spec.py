"""What a language-model bundle declares about itself, and what it needs in memory (pure).

The converter writes an ``llm`` section into the manifest; the fleet checks it against a
board profile's ``model_memory_budget_mb`` when a release is signed and the agent checks it
again before it downloads a variant. Both use ``memory_need_mb`` below, so host and device
agree on the number.

Memory need = weights as loaded (not as stored: fp16 weights are widened to fp32 on a CPU)
+ the KV cache for one sequence at the maximum context (two tensors per layer of
``kv_heads x context x head_dim`` elements) x the concurrent sequences the agent allows
+ the logits of a full-context prefill + a fixed runtime allowance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from edgeship.agent.errors import BundleError, EdgeshipError, Reason

TASK = "text-generation"
LLM_RUNTIME = "onnxruntime-genai"
LLM_PRECISIONS = ("int4", "int8", "fp16", "fp32")  # the agent's order of preference
#: runtime allowance beyond weights and cache: onnxruntime-genai, arenas, tokenizer
RUNTIME_OVERHEAD_MB = 64.0
MB = 1024 * 1024


class MemoryBudgetError(EdgeshipError):
    """A language model would not fit the device's memory budget."""

    reason_code = Reason.MEMORY_BUDGET_EXCEEDED

    def __init__(self, message: str, *, need_mb: float, budget_mb: float) -> None:
        super().__init__(message)
        self.need_mb = need_mb
        self.budget_mb = budget_mb


@dataclass(frozen=True)
class LlmSpec:
    context_length: int
    vocab_size: int
    layers: int
    kv_heads: int
    head_dim: int
    kv_dtype_bytes: int = 4
    eos_token_ids: tuple[int, ...] = ()
    chat_template: bool = False
    golden_top_k: int = 5
    max_sequences: int = 1  # sequences that hold a KV cache at once

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, raw: Any) -> "LlmSpec":
        if not isinstance(raw, dict):
            raise BundleError("manifest llm section is not an object")
        try:
            spec = cls(**{**raw, "eos_token_ids": tuple(int(t) for t in
                                                         raw.get("eos_token_ids", ()))})
        except TypeError as e:
            raise BundleError(f"manifest llm section invalid: {e}") from e
        ints = (spec.context_length, spec.vocab_size, spec.layers, spec.kv_heads,
                spec.head_dim, spec.kv_dtype_bytes, spec.golden_top_k, spec.max_sequences)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in ints):
            raise BundleError(f"manifest llm section has a bad size: {raw!r}")
        return spec


def kv_cache_mb(spec: LlmSpec, context: int | None = None) -> float:
    """KV cache of one sequence at ``context`` tokens (the model's maximum by default)."""
    ctx = spec.context_length if context is None else context
    return 2 * spec.layers * spec.kv_heads * spec.head_dim * ctx * spec.kv_dtype_bytes / MB


def memory_need_mb(spec: LlmSpec, weights_mb: float, context: int | None = None) -> float:
    ctx = spec.context_length if context is None else context
    logits_mb = ctx * spec.vocab_size * 4 / MB
    return (weights_mb + kv_cache_mb(spec, ctx) * spec.max_sequences + logits_mb
            + RUNTIME_OVERHEAD_MB)


def variant_memory_mb(spec: LlmSpec, metrics: dict[str, float]) -> float:
    """Memory need of a variant from the weights size the converter measured."""
    weights = metrics.get("weights_mb")
    if weights is None:
        raise BundleError("language-model variant does not say its weights_mb")
    return memory_need_mb(spec, float(weights))


def check_fits(model: str, spec: LlmSpec, metrics: dict[str, float], budget_mb: float,
               *, where: str = "this device") -> float:
    """Raise ``MemoryBudgetError`` when the variant needs more than ``budget_mb``."""
    need = variant_memory_mb(spec, metrics)
    if need > budget_mb:
        raise MemoryBudgetError(
            f"{model} needs {need:.0f} MB (weights {metrics.get('weights_mb', 0):.0f} MB + KV "
            f"cache {kv_cache_mb(spec) * spec.max_sequences:.0f} MB at {spec.context_length} "
            f"tokens) but {where} allows {budget_mb:.0f} MB",
            need_mb=need, budget_mb=budget_mb)
    return need


def check_top_k(got: Any, expected: Any, k: int, atol: float) -> float:
    """The golden prompt's next-token check: the golden top-``k`` token ids must be the
    device's top-``k`` (as a set; ties within ``atol`` of the k-th may swap places) and
    their logits must agree within ``atol``. Raises ``HealthCheckError`` (TOKEN_MISMATCH) on
    other tokens; returns the largest logit difference over the golden top-k."""
    import numpy as np

    from edgeship.agent.errors import HealthCheckError

    g, e = np.asarray(got, np.float64).reshape(-1), np.asarray(expected, np.float64).reshape(-1)
    k = min(k, e.size)
    top = np.argsort(-e, kind="stable")[:k]
    mine = np.argsort(-g, kind="stable")[:k]
    kth = e[top[-1]]
    missing = [int(t) for t in top if t not in set(mine.tolist()) and e[t] > kth + atol]
    diff = float(np.max(np.abs(g[top] - e[top])))
    if missing or int(mine[0]) != int(top[0]) and e[top[0]] - e[mine[0]] > atol:
        raise HealthCheckError(f"next-token top-{k} {mine.tolist()} != golden {top.tolist()}",
                               max_abs_diff=diff, reason_code=Reason.TOKEN_MISMATCH)
    return diff  # the caller compares it with atol (GOLDEN_MISMATCH)
