"""Held-out text through each variant: perplexity, next-token top-1 agreement and KL.

Every variant is run with onnxruntime on the same windows of held-out tokens (an empty KV
cache, the whole window as the prompt: the logits of every position at once). The fp32
graph's logits are the reference; a variant's numbers are

- ``perplexity``: exp of the mean negative log-likelihood of the true next tokens;
- ``ppl_increase``: its perplexity over the fp32 graph's, minus one (0.05 = +5 %);
- ``top1_agreement``: fraction of positions where its arg-max next token is fp32's;
- ``mean_kl``: mean KL(fp32 ‖ variant) of the next-token distributions, in nats.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeship.converter.errors import EvaluationError


@dataclass(frozen=True)
class LmGate:
    max_ppl_increase: float = 0.05
    min_top1_agreement: float = 0.90
    max_mean_kl: float = 0.05

    def check(self, metrics: dict[str, float]) -> list[str]:
        failures = []
        if metrics["ppl_increase"] > self.max_ppl_increase:
            failures.append(f"perplexity +{metrics['ppl_increase'] * 100:.2f} % > "
                            f"+{self.max_ppl_increase * 100:.2f} %")
        if metrics["top1_agreement"] < self.min_top1_agreement:
            failures.append(f"top-1 agreement {metrics['top1_agreement']:.4f} < "
                            f"{self.min_top1_agreement:.4f}")
        if metrics["mean_kl"] > self.max_mean_kl:
            failures.append(f"mean KL {metrics['mean_kl']:.4f} > {self.max_mean_kl:.4f}")
        return failures


class LogitsRunner:
    """All-position logits of a genai-builder graph for one window, empty KV cache."""

    def __init__(self, model, head_dim: int, threads: int = 0) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        data = model if isinstance(model, (str, Path)) else model.SerializeToString()
        try:
            self.session = ort.InferenceSession(str(data) if isinstance(data, Path) else data,
                                                opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise EvaluationError(f"onnxruntime cannot load the variant: {e}") from e
        self._past = []
        for i in self.session.get_inputs():
            if i.name.startswith("past_key_values"):
                heads = i.shape[1] if isinstance(i.shape[1], int) else 1
                self._past.append((i.name, heads, head_dim))

    def logits(self, ids: np.ndarray) -> np.ndarray:
        n = len(ids)
        feed = {"input_ids": ids.reshape(1, n).astype(np.int64),
                "attention_mask": np.ones((1, n), dtype=np.int64)}
        for name, heads, dim in self._past:
            feed[name] = np.zeros((1, heads, 0, dim), dtype=np.float32)
        return self.session.run(["logits"], feed)[0][0].astype(np.float32)


def windows(ids: np.ndarray, seq_len: int, count: int) -> list[np.ndarray]:
    """Up to ``count`` non-overlapping windows of ``seq_len + 1`` tokens (input + target)."""
    out = [ids[s:s + seq_len + 1] for s in range(0, len(ids) - seq_len - 1, seq_len)]
    if not out:
        raise EvaluationError(f"held-out text has {len(ids)} tokens, fewer than one window "
                              f"of {seq_len + 1}")
    return out[:count]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


@dataclass
class Reference:
    """The fp32 graph's log-probabilities per window (kept as float32)."""

    windows: list[np.ndarray]
    logp: list[np.ndarray]
    head_dim: int

    @classmethod
    def measure(cls, runner: LogitsRunner, wins: Sequence[np.ndarray],
                head_dim: int) -> "Reference":
        return cls(list(wins), [_log_softmax(runner.logits(w[:-1])).astype(np.float32)
                                for w in wins], head_dim)


def compare(runner: LogitsRunner, ref: Reference) -> dict[str, float]:
    nll = kl = agree = 0.0
    count = 0
    start = time.perf_counter()
    for win, ref_logp in zip(ref.windows, ref.logp):
        logits = runner.logits(win[:-1])
        if not np.all(np.isfinite(logits)):
            raise EvaluationError("variant produced NaN or infinite logits")
        logp = _log_softmax(logits)
        targets = win[1:]
        nll -= float(logp[np.arange(len(targets)), targets].sum())
        p = np.exp(ref_logp.astype(np.float64))
        kl += float((p * (ref_logp - logp)).sum())
        agree += float((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
        count += len(targets)
    ref_nll = -sum(float(lp[np.arange(len(w) - 1), w[1:]].sum())
                   for w, lp in zip(ref.windows, ref.logp))
    ppl, ref_ppl = float(np.exp(nll / count)), float(np.exp(ref_nll / count))
    return {"perplexity": ppl, "ppl_increase": ppl / ref_ppl - 1,
            "top1_agreement": agree / count, "mean_kl": max(0.0, kl / count),
            "eval_tokens": float(count),
            "eval_ms_per_token": (time.perf_counter() - start) * 1000 / count}
