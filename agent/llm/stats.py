"""Per-model generation numbers: time to first token, prefill and decode rates, tokens.

A window (reset when telemetry sends it) and cumulative token counts per version. The
request path appends one small tuple per completion under a lock; the maths runs when
telemetry or a Prometheus scrape reads it. Each completion is also recorded in the model's
ordinary ``ModelStats`` with its *decode time per token* as the latency, so the fleet's
latency gate (new p50 / old p50) is a decode-rate gate for language models.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

if TYPE_CHECKING:  # telemetry imports this module on every agent, LM or not
    from edgeship.agent.llm.runtime import GenerationStats

WINDOW = 4096
#: the attribute of a ``ModelServer`` that holds its ``agent.llm.http.LmFrontend``
FRONTEND_ATTR = "_edgeship_llm"


def ns_per_decoded_token(s: GenerationStats) -> int | None:
    if s.generated_tokens < 2 or s.decode_s <= 0:
        return None
    return int(s.decode_s * 1e9 / (s.generated_tokens - 1))


class LmStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._window: deque[tuple[float, float, float]] = deque(maxlen=WINDOW)
        self.tokens_by_version: dict[int, int] = {}
        self.prompt_tokens_by_version: dict[int, int] = {}
        self.cancelled = 0

    def record(self, version: int, s: GenerationStats) -> None:
        prefill_tps = s.prompt_tokens / s.prefill_s if s.prefill_s > 0 else 0.0
        ns = ns_per_decoded_token(s)
        decode_tps = 1e9 / ns if ns else 0.0
        with self._lock:
            self._window.append((s.prefill_s * 1000, prefill_tps, decode_tps))
            self.tokens_by_version[version] = (self.tokens_by_version.get(version, 0)
                                               + s.generated_tokens)
            self.prompt_tokens_by_version[version] = (
                self.prompt_tokens_by_version.get(version, 0) + s.prompt_tokens)
            if s.finish_reason == "cancelled":
                self.cancelled += 1

    def snapshot(self, reset: bool = True) -> dict[str, Any]:
        with self._lock:
            rows = np.array(self._window, dtype=np.float64).reshape(-1, 3)
            if reset:
                self._window.clear()
            tokens = dict(self.tokens_by_version)
        decode = rows[:, 2][rows[:, 2] > 0]

        def q(col: np.ndarray, p: float) -> float | None:
            return float(np.percentile(col, p)) if col.size else None

        return {"completions": int(rows.shape[0]),
                "ttft_ms": {"p50": q(rows[:, 0], 50), "p95": q(rows[:, 0], 95)},
                "prefill_tokens_per_s": q(rows[:, 1], 50),
                "decode_tokens_per_s": q(decode, 50),
                "generated_tokens_total": {str(k): v for k, v in tokens.items()},
                "cancelled_total": self.cancelled}


def _frontend_stats(server: Any) -> dict[str, LmStats]:
    # agent.llm.http.frontend's attribute, read without building it (ModelServer builds it
    # on first lookup): no front end yet, no numbers
    fe = vars(server).get(FRONTEND_ATTR)
    return fe.stats if fe is not None else {}


def lm_window(server: Any, model: str, reset: bool = True) -> dict[str, Any] | None:
    """The telemetry window of ``model``'s generation numbers, or None (not an LM)."""
    stats = _frontend_stats(server).get(model)
    return stats.snapshot(reset=reset) if stats is not None else None


def lm_metric_families(server: Any) -> Iterator[Any]:
    """Prometheus families for every language model ``server`` serves (none otherwise)."""
    all_stats = _frontend_stats(server)
    if not all_stats:
        return
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    labels = ["model", "version", "variant"]
    tokens = CounterMetricFamily("edgeship_llm_generated_tokens", "Tokens generated, per "
                                 "model version", labels=["model", "version"])
    ttft = GaugeMetricFamily("edgeship_llm_ttft_ms", "Time to first token (median over the "
                             "telemetry window)", labels=labels)
    prefill = GaugeMetricFamily("edgeship_llm_prefill_tokens_per_s", "Prompt tokens per "
                                "second (median over the window)", labels=labels)
    decode = GaugeMetricFamily("edgeship_llm_decode_tokens_per_s", "Generated tokens per "
                               "second after the first (median over the window)", labels=labels)
    active = GaugeMetricFamily("edgeship_llm_active_sequences", "Generations holding a KV "
                               "cache now", labels=labels)
    for loaded in server.models():
        inst = loaded.installed
        stats = all_stats.get(inst.model)
        if stats is None:
            continue
        for version, count in sorted(stats.tokens_by_version.items()):
            tokens.add_metric([inst.model, str(version)], count)
        values = [inst.model, str(inst.version), inst.variant.id]
        snap = stats.snapshot(reset=False)
        for family, value in ((ttft, snap["ttft_ms"]["p50"]),
                              (prefill, snap["prefill_tokens_per_s"]),
                              (decode, snap["decode_tokens_per_s"])):
            if value is not None:
                family.add_metric(values, value)
        active.add_metric(values, getattr(loaded.runtime, "active_sequences", 0))
    yield from (tokens, ttft, prefill, decode, active)
