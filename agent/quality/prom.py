"""Prometheus families for model quality (the agent's ``/metrics``; the same numbers as the
``quality`` section of telemetry). The estimate is its own family, named as an estimate."""

from __future__ import annotations

from typing import Any, Iterator

from edgeship.agent.quality.metrics import counts_from_dict, report

_GAUGES = (
    ("drift", "edgeship_model_drift_js", "Jensen-Shannon distance of the live window from "
     "the reference profile, per signal", ["model", "version", "signal"]),
    ("chance", "edgeship_model_drift_chance_js", "JS distance expected from sampling alone "
     "(no drift)", ["model", "version", "signal"]),
    ("est", "edgeship_model_estimated_accuracy", "Label-free accuracy ESTIMATE (difference of "
     "confidences; ATC for older bundles) over the window", ["model", "version"]),
    ("window", "edgeship_model_drift_window_samples", "Samples in the drift window",
     ["model", "version"]),
    ("accuracy", "edgeship_model_labelled_accuracy", "Accuracy measured from feedback",
     ["model", "version"]),
    ("accuracy_ci", "edgeship_model_labelled_accuracy_ci_low",
     "Lower end of the accuracy's 95 % interval", ["model", "version"]),
    ("f1_macro", "edgeship_model_labelled_f1_macro", "Macro F1 measured from feedback",
     ["model", "version"]),
    ("f1_macro_ci", "edgeship_model_labelled_f1_macro_ci_low",
     "Lower end of the macro F1's 95 % interval", ["model", "version"]))
_COUNTERS = (
    ("labelled", "edgeship_model_labelled_samples", "Samples with feedback",
     ["model", "version"]),
    ("fb", "edgeship_model_feedback", "Feedback items by outcome", ["model", "outcome"]))
OUTCOMES = ("accepted", "unknown", "duplicate", "invalid", "evicted_memory", "evicted_disk")


def quality_metrics(server: Any) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    fam: dict[str, Any] = {key: GaugeMetricFamily(name, doc, labels=labels)
                           for key, name, doc, labels in _GAUGES}
    fam.update({key: CounterMetricFamily(name, doc, labels=labels)
                for key, name, doc, labels in _COUNTERS})
    served = {m.installed.model: (m.installed.version, m.installed.variant.id)
              for m in server.models()}
    for model, doc in server.quality.telemetry(served, flush=False).items():
        _drift(fam, model, str(doc["version"]), doc.get("drift"))
        _labelled(fam, model, doc["labelled"])
        for outcome in OUTCOMES:
            fam["fb"].add_metric([model, outcome], doc["feedback"].get(outcome, 0))
    yield from fam.values()


def _drift(fam: dict[str, Any], model: str, version: str, d: dict[str, Any] | None) -> None:
    if d is None:
        return
    fam["window"].add_metric([model, version], d["samples"])
    for name, s in d["signals"].items():
        if s["js"] is not None:
            fam["drift"].add_metric([model, version, name], s["js"])
            fam["chance"].add_metric([model, version, name], s["chance"] or 0.0)
    if d.get("estimate", {}).get("accuracy") is not None:
        fam["est"].add_metric([model, version], d["estimate"]["accuracy"])


def _labelled(fam: dict[str, Any], model: str, labelled: dict[str, Any]) -> None:
    for version, counts in labelled.items():
        fam["labelled"].add_metric([model, version], counts["n"])
        if "tp" not in counts:
            continue
        rep = report(counts_from_dict(counts))
        for key in ("accuracy", "accuracy_ci", "f1_macro", "f1_macro_ci"):
            value = rep[key][0] if key.endswith("_ci") and rep[key] else rep[key]
            if isinstance(value, float):
                fam[key].add_metric([model, version], value)
