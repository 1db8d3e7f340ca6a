"""Prometheus exposition of the agent's numbers (the same ones telemetry carries).

A custom collector reads the live state at scrape time, so there is no second copy of any
counter and nothing runs between scrapes (idle CPU stays at zero). Per-model latency is a
cumulative histogram (``edgeship_model_latency_seconds``); the p50/p95/p99 gauges are over
the current telemetry window (since the last batch), as in the telemetry records.
``prometheus_client`` is imported at the first scrape (or when the metrics port opens), not
when the agent starts: an agent nobody scrapes does not carry it (~1 MB of RSS).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

from edgeship.agent.llm.stats import lm_metric_families
from edgeship.agent.serving import LATENCY_BUCKETS_MS, ModelServer
from edgeship.agent.spool import TelemetrySpool

logger = logging.getLogger(__name__)


class AgentCollector:
    """A prometheus_client collector (``collect``; registered without ``describe``)."""

    def __init__(self, server: ModelServer, spool: TelemetrySpool | None,
                 device: Callable[[], dict[str, Any]], info: dict[str, str]) -> None:
        self.server = server
        self.spool = spool
        self.device = device
        self.info = info

    def collect(self) -> Iterator[Any]:
        yield from self._models()
        yield from lm_metric_families(self.server)
        if self.server.quality is not None:
            from edgeship.agent.quality.prom import quality_metrics
            yield from quality_metrics(self.server)
        yield from self._spool()
        yield from self._device()

    def _models(self) -> Iterator[Any]:
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                           HistogramMetricFamily)
        labels = ["model", "version", "variant"]
        req = CounterMetricFamily("edgeship_model_requests", "Inference requests", labels=labels)
        err = CounterMetricFamily("edgeship_model_errors", "Failed inference requests",
                                  labels=labels)
        smp = CounterMetricFamily("edgeship_model_samples", "Samples (batch rows) inferred",
                                  labels=labels)
        lat = GaugeMetricFamily("edgeship_model_latency_ms", "Inference latency quantiles "
                                "over the current telemetry window", labels=labels + ["quantile"])
        hist = HistogramMetricFamily("edgeship_model_latency_seconds", "Inference latency",
                                     labels=labels)
        rate = GaugeMetricFamily("edgeship_model_input_rate_per_s", "Samples per second over "
                                 "the current telemetry window", labels=labels)
        for loaded in self.server.models():
            inst = loaded.installed
            values = [inst.model, str(inst.version), inst.variant.id]
            stats = self.server.stats[inst.model]
            totals = stats.totals()
            req.add_metric(values, totals["requests"])
            err.add_metric(values, totals["errors"])
            smp.add_metric(values, totals["samples"])
            counts, sum_ms = stats.histogram()
            hist.add_metric(values, _buckets(counts), sum_ms / 1000)
            snap = stats.snapshot(reset=False)
            rate.add_metric(values, snap["input_rate_per_s"])
            for q in ("p50", "p95", "p99"):
                if snap["latency_ms"][q] is not None:
                    lat.add_metric(values + [q], snap["latency_ms"][q])
        yield from (req, err, smp, hist, lat, rate)

    def _spool(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        if self.spool is None:
            return
        st = self.spool.stats()
        yield GaugeMetricFamily("edgeship_telemetry_queued", "Records waiting for a PUBACK",
                                value=st.queued)
        for name, doc in (("evicted", "Records evicted from a full queue"),
                          ("acked", "Records the broker accepted"),
                          ("dead_lettered", "Records the broker refused")):
            yield CounterMetricFamily(f"edgeship_telemetry_{name}", doc,
                                      value=getattr(st, name))

    def _device(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily
        info = GaugeMetricFamily("edgeship_agent_info", "Agent and device facts",
                                 labels=sorted(self.info))
        info.add_metric([self.info[k] for k in sorted(self.info)], 1)
        yield info
        dev = self.device()
        for key, doc in (("cpu_percent", "System CPU busy since the last sample"),
                         ("rss_mb", "Agent resident memory"),
                         ("temperature_c", "Hottest thermal zone"),
                         ("disk_free_mb", "Free disk under the state directory")):
            if dev.get(key) is not None:
                yield GaugeMetricFamily(f"edgeship_device_{key}", doc, value=dev[key])
        mem = dev.get("memory") or {}
        if mem.get("available_mb") is not None:
            yield GaugeMetricFamily("edgeship_device_memory_available_mb",
                                    "MemAvailable", value=mem["available_mb"])


def _buckets(counts: list[int]) -> list[tuple[str, float]]:
    """Per-bucket counts → Prometheus' cumulative ``le`` buckets, in seconds."""
    out: list[tuple[str, float]] = []
    running = 0
    for bound_ms, n in zip(LATENCY_BUCKETS_MS, counts):
        running += n
        out.append((repr(bound_ms / 1000), running))
    out.append(("+Inf", running + counts[-1]))
    return out


class Metrics:
    """A private registry (no process/platform collectors: nothing extra to compute),
    created at the first scrape."""

    def __init__(self, collector: AgentCollector) -> None:
        self.collector = collector
        self._registry: Any = None
        self._server: Any = None

    @property
    def registry(self) -> Any:
        if self._registry is None:
            from prometheus_client import CollectorRegistry
            registry = CollectorRegistry(auto_describe=False)
            registry.register(self.collector)
            self._registry = registry  # two first scrapes at once: one registry wins
        return self._registry

    def text(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> None:
        from prometheus_client import start_http_server
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        logger.info("Prometheus metrics on http://%s:%d/metrics", host, port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
