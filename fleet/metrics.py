"""Prometheus metrics for the fleet, computed from the registry and the server's counters
at scrape time (a custom collector: nothing to keep in sync)."""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterator


class FleetCollector:
    def __init__(self, server: Any) -> None:
        self.server = server  # fleet.server.FleetServer (registry + stats)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        registry = self.server.registry
        devices = registry.devices()
        online = GaugeMetricFamily("edgeship_devices", "Devices in the registry",
                                   labels=["online"])
        online.add_metric(["true"], sum(d.online for d in devices))
        online.add_metric(["false"], sum(not d.online for d in devices))
        yield online
        running = GaugeMetricFamily("edgeship_devices_running",
                                    "Devices that report serving a model version",
                                    labels=["model", "version"])
        counts: Counter = Counter()
        for d in devices:
            for model in (d.models or {}) if isinstance(d.models, dict) else {}:
                counts[(model, str(d.running(model)))] += 1
        for (model, version), n in sorted(counts.items()):
            running.add_metric([model, version], n)
        yield running
        yield from self._rollouts(registry)
        from edgeship.fleet.quality_metrics import quality_families
        yield from quality_families(registry)
        stats = self.server.stats.snapshot()
        for name, help_text in (("bytes_sent", "Transfer bytes sent"),
                                ("requests_served", "Transfer chunks served"),
                                ("transfer_errors", "Transfer requests answered with an error"),
                                ("records", "Device reports stored"),
                                ("malformed", "Messages refused as malformed"),
                                ("busy", "Transfer requests answered 503 (slot caps)"),
                                ("dropped", "Messages dropped (queue full)"),
                                ("reports_dropped", "Device reports dropped (registry "
                                 "writer behind)")):
            c = CounterMetricFamily(f"edgeship_fleet_{name}", help_text)
            c.add_metric([], stats.get(name, 0))
            yield c

    def _rollouts(self, registry) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily
        state = GaugeMetricFamily("edgeship_rollout_info", "Open and finished rollouts",
                                  labels=["rollout", "model", "state"])
        moved = GaugeMetricFamily("edgeship_rollout_devices_moved",
                                  "Devices told to run the new version",
                                  labels=["rollout", "model"])
        wave = GaugeMetricFamily("edgeship_rollout_wave", "Current wave (1-based)",
                                 labels=["rollout", "model"])
        for doc in registry.rollouts():
            state.add_metric([doc["id"], doc["model"], doc["state"]], 1)
            moved.add_metric([doc["id"], doc["model"]], len(doc.get("sent", {})))
            wave.add_metric([doc["id"], doc["model"]], doc.get("wave", 0) + 1)
        yield from (state, moved, wave)


def render(server: Any) -> tuple[bytes, str]:
    """The exposition text for /metrics and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    reg = CollectorRegistry(auto_describe=False)
    reg.register(FleetCollector(server))
    return generate_latest(reg), CONTENT_TYPE_LATEST
