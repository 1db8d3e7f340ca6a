"""Prometheus families for model quality across the fleet (``fleet serve``'s /metrics): the
numbers the dashboard and ``fleet quality`` show, per model and version, fleet-wide and per
device group. Metrics from feedback appear only with at least ``MIN_LABELLED`` labels (the
sample count is always there); the estimate has its own family, named as an estimate."""

from __future__ import annotations

from typing import Any, Iterator

from edgeship.fleet.quality_store import quality_doc

SINCE_S = 3600.0


def quality_families(registry: Any) -> Iterator[Any]:
    from prometheus_client.core import GaugeMetricFamily

    labels = ["model", "version", "group"]
    fam = {name: GaugeMetricFamily(f"edgeship_fleet_quality_{name}", doc, labels=labels)
           for name, doc in (
               ("labelled_samples", "Samples with feedback (labels)"),
               ("accuracy", "Accuracy from feedback (only with enough labels)"),
               ("accuracy_ci_low", "Lower end of the accuracy's 95 % interval"),
               ("precision_macro", "Macro precision from feedback"),
               ("precision_macro_ci_low", "Lower end of the macro precision's 95 % interval"),
               ("recall_macro", "Macro recall from feedback"),
               ("recall_macro_ci_low", "Lower end of the macro recall's 95 % interval"),
               ("f1_macro", "Macro F1 from feedback"),
               ("f1_macro_ci_low", "Lower end of the macro F1's 95 % interval"),
               ("estimated_accuracy", "Label-free accuracy ESTIMATE (difference of "
                                      "confidences) over the devices' current windows"),
               ("drift_js", "Largest Jensen-Shannon distance of a signal, pooled"),
               ("drift_chance_js", "JS distance expected from sampling alone"),
               ("drift_samples", "Samples in the pooled drift windows"))}
    groups = sorted({d.group for d in registry.devices() if d.group})
    for model in sorted(registry.quality.models()):
        for group in [None, *groups]:
            doc = quality_doc(registry, model, group=group, since_s=SINCE_S)
            for version, v in doc["versions"].items():
                _add(fam, [model, version, group or ""], v)
    yield from fam.values()


def _add(fam: dict[str, Any], key: list[str], v: dict[str, Any]) -> None:
    lab, est, drift = v["labelled"], v["estimate"], v["drift"]
    values = {"labelled_samples": lab.get("samples"),
              "estimated_accuracy": est.get("accuracy"), "drift_js": drift.get("js"),
              "drift_chance_js": drift.get("chance"), "drift_samples": drift.get("samples")}
    for metric in ("accuracy", "precision_macro", "recall_macro", "f1_macro"):
        values[metric] = lab.get(metric)
        values[f"{metric}_ci_low"] = (lab.get(f"{metric}_ci") or [None])[0]
    for name, value in values.items():
        if value is not None:
            fam[name].add_metric(key, float(value))
