"""Prometheus families for model quality (the agent's ``/metrics``; the same numbers as the
``quality`` section of telemetry). The estimate is its own family, named as an estimate."""

from __future__ import annotations

from typing import Any, Iterator

from edgeship.agent.quality.metrics import counts_from_dict, report


def quality_metrics(server: Any) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    served = {m.installed.model: (m.installed.version, m.installed.variant.id)
              for m in server.models()}
    docs = server.quality.telemetry(served, flush=False)
    drift = GaugeMetricFamily("edgeship_model_drift_js", "Jensen-Shannon distance of the "
                              "live window from the reference profile, per signal",
                              labels=["model", "version", "signal"])
    chance = GaugeMetricFamily("edgeship_model_drift_chance_js", "JS distance expected "
                               "from sampling alone (no drift)",
                               labels=["model", "version", "signal"])
    est = GaugeMetricFamily("edgeship_model_estimated_accuracy", "Label-free accuracy "
                            "ESTIMATE (average thresholded confidence) over the window",
                            labels=["model", "version"])
    window = GaugeMetricFamily("edgeship_model_drift_window_samples", "Samples in the "
                               "drift window", labels=["model", "version"])
    acc = GaugeMetricFamily("edgeship_model_labelled_accuracy", "Accuracy measured from "
                            "feedback", labels=["model", "version"])
    f1 = GaugeMetricFamily("edgeship_model_labelled_f1_macro", "Macro F1 measured from "
                           "feedback", labels=["model", "version"])
    labelled = CounterMetricFamily("edgeship_model_labelled_samples", "Samples with "
                                   "feedback", labels=["model", "version"])
    fb = CounterMetricFamily("edgeship_model_feedback", "Feedback items by outcome",
                             labels=["model", "outcome"])
    for model, doc in docs.items():
        v = str(doc["version"])
        d = doc.get("drift")
        if d is not None:
            window.add_metric([model, v], d["samples"])
            for name, s in d["signals"].items():
                if s["js"] is not None:
                    drift.add_metric([model, v, name], s["js"])
                    chance.add_metric([model, v, name], s["chance"] or 0.0)
            if d.get("estimate", {}).get("accuracy") is not None:
                est.add_metric([model, v], d["estimate"]["accuracy"])
        for version, counts in doc["labelled"].items():
            labelled.add_metric([model, version], counts["n"])
            if "tp" in counts:
                rep = report(counts_from_dict(counts))
                if rep["accuracy"] is not None:
                    acc.add_metric([model, version], rep["accuracy"])
                if rep["f1_macro"] is not None:
                    f1.add_metric([model, version], rep["f1_macro"])
        for outcome in ("accepted", "unknown", "duplicate", "invalid", "evicted_memory",
                        "evicted_disk"):
            fb.add_metric([model, outcome], doc["feedback"].get(outcome, 0))
    yield from (drift, chance, est, window, acc, f1, labelled, fb)
