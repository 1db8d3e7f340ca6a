"""Model quality across the fleet, pure: reports in, pooled numbers per version and cohort out.

Devices send, per served model, a ``quality`` section in their telemetry
(``agent.quality.hub``): the drift window's histogram counts per signal with the
reference shares, the label-free estimate's counts, and the cumulative labelled counts of
their latest versions. Pooling is exact where it can be: histogram counts and estimate
counts are summed over the latest report of each device (their current windows), labelled
counts over the latest report of each device that mentions the version (they are
cumulative). So a cohort of many devices gets a smaller chance level and tighter
intervals than any one device.

Honest numbers: :func:`summary` never shows accuracy or F1 computed from fewer than
``min_labelled`` samples — it says "too few labels" and how many there are — and the
label-free number is always under ``estimate`` with ``"is_estimate": true``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from edgeship.agent.quality.drift import chance_js, js_distance, psi
from edgeship.agent.quality.metrics import (ClassCounts, Counts, RegressionCounts,
                                            counts_from_dict, f1_ci, macro_f1, macro_note,
                                            proportion_se, report, share_ci, wilson)
from edgeship.agent.quality.profile import ESTIMATE_METHODS

MIN_LABELLED = 200
#: above this JS distance the estimate is flagged: under strong shift it can be far off
ESTIMATE_DRIFT_WARNING = 0.25


@dataclass(frozen=True)
class QualityReport:
    """One device's quality section for one model, as stored."""

    device: str
    ts: float
    model: str
    version: int
    doc: Mapping[str, Any]

    @property
    def drift(self) -> Mapping[str, Any] | None:
        d = self.doc.get("drift")
        return d if isinstance(d, Mapping) else None

    @property
    def samples(self) -> int:
        d = self.drift
        return int(d.get("samples", 0)) if d else 0

    def labelled(self, version: int) -> Counts | None:
        doc = (self.doc.get("labelled") or {}).get(str(version))
        if not isinstance(doc, Mapping) or ("tp" not in doc and "sum_abs" not in doc):
            return None
        try:
            return counts_from_dict(doc)
        except (KeyError, TypeError, ValueError):
            return None


def reports_from_telemetry(device: str, ts: float, msg: Mapping[str, Any]
                           ) -> list[QualityReport]:
    """The quality sections of one telemetry record (malformed ones are skipped)."""
    section = msg.get("quality")
    out = []
    for model, doc in (section.items() if isinstance(section, Mapping) else ()):
        version = doc.get("version") if isinstance(doc, Mapping) else None
        if isinstance(version, int) and not isinstance(version, bool):
            out.append(QualityReport(device, ts, str(model)[:64], version, doc))
    return out


def drift_max(doc: Mapping[str, Any]) -> tuple[float | None, str | None]:
    """The largest JS distance in one report, and its signal."""
    signals = (doc.get("drift") or {}).get("signals") or {}
    best: tuple[float | None, str | None] = (None, None)
    for name, s in signals.items():
        js = s.get("js") if isinstance(s, Mapping) else None
        if isinstance(js, (int, float)) and (best[0] is None or js > best[0]):
            best = (float(js), str(name))
    return best


@dataclass
class SignalPool:
    counts: np.ndarray
    ref: np.ndarray
    reference_samples: int = 0


@dataclass
class VersionQuality:
    """One version's numbers pooled over a set of devices."""

    devices: int = 0
    window_samples: int = 0
    signals: dict[str, SignalPool] = field(default_factory=dict)
    estimate_n: int = 0
    estimate_above: int = 0
    estimate_methods: set[str] = field(default_factory=set)
    reference_accuracy: float | None = None
    labelled: Counts | None = None
    labelled_devices: int = 0

    def drift(self) -> dict[str, dict[str, float | None]]:
        out = {}
        for name, pool in self.signals.items():
            n = int(pool.counts.sum())
            out[name] = {"js": js_distance(pool.counts, pool.ref),
                         "psi": psi(pool.counts, pool.ref),
                         "chance": chance_js(len(pool.ref), n, pool.reference_samples),
                         "samples": n}
        return out

    def worst_drift(self) -> tuple[str | None, float | None, float | None]:
        """(signal, JS distance, chance level) of the most drifted signal."""
        best: tuple[str | None, float | None, float | None] = (None, None, None)
        for name, d in self.drift().items():
            if d["js"] is not None and (best[1] is None or d["js"] > best[1]):
                best = (name, d["js"], d["chance"])
        return best

    @property
    def estimate(self) -> float | None:
        return self.estimate_above / self.estimate_n if self.estimate_n else None

    def estimate_se(self) -> float | None:
        return proportion_se(self.estimate_above, self.estimate_n) if self.estimate_n \
            else None


def pool_windows(reports: Iterable[QualityReport]) -> VersionQuality:
    """Drift and estimate pooled over the given reports (one per device: its window)."""
    vq = VersionQuality()
    for r in reports:
        d = r.drift
        if not d:
            continue
        vq.devices += 1
        vq.window_samples += int(d.get("samples", 0))
        for name, s in (d.get("signals") or {}).items():
            _add_signal(vq, str(name), s, int(d.get("reference_samples", 0)))
        est = d.get("estimate")
        if isinstance(est, Mapping) and isinstance(est.get("samples"), int):
            vq.estimate_n += est["samples"]
            vq.estimate_above += int(est.get("above", 0))
            vq.estimate_methods.add(str(est.get("method", "atc"))[:16])
            if isinstance(est.get("reference_accuracy"), (int, float)):
                vq.reference_accuracy = float(est["reference_accuracy"])
    return vq


def _add_signal(vq: VersionQuality, name: str, s: Any, reference_samples: int) -> None:
    if not isinstance(s, Mapping):
        return
    try:
        counts = np.asarray(s["counts"], dtype=np.int64)
        ref = np.asarray(s["ref"], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        return
    if counts.ndim != 1 or counts.shape != ref.shape or (counts < 0).any():
        return
    pool = vq.signals.get(name)
    if pool is None:
        vq.signals[name] = SignalPool(counts.copy(), ref, reference_samples)
    elif pool.counts.shape == counts.shape:
        pool.counts += counts


def pool_labelled(reports: Iterable[QualityReport], version: int) -> tuple[Counts | None, int]:
    """Labelled counts of ``version`` summed over the devices' latest reports that carry
    them (one per device), and how many devices did."""
    total: Counts | None = None
    devices = 0
    for r in reports:
        c = r.labelled(version)
        if c is None:
            continue
        devices += 1
        if total is None:
            total = ClassCounts(c.classes) if isinstance(c, ClassCounts) else RegressionCounts()
        if type(c) is type(total):
            total.merge(c)  # type: ignore[arg-type]
    return total, devices


def version_quality(window_reports: Sequence[QualityReport],
                    labelled_reports: Sequence[QualityReport], version: int) -> VersionQuality:
    vq = pool_windows(r for r in window_reports if r.version == version)
    vq.labelled, vq.labelled_devices = pool_labelled(labelled_reports, version)
    return vq


def summary(vq: VersionQuality, labels: Sequence[str] = (), *, confidence: float = 0.95,
            min_labelled: int = MIN_LABELLED) -> dict[str, Any]:
    """What the dashboard, the CLI and the REST API show for one version (JSON)."""
    doc: dict[str, Any] = {"devices": vq.devices, "labelled_devices": vq.labelled_devices}
    n = _n(vq.labelled)
    if n == 0:
        doc["labelled"] = {"samples": 0, "note": "no labels yet"}
    elif n < min_labelled:
        doc["labelled"] = {"samples": n, "note": f"too few labels ({n} of the "
                                                 f"{min_labelled} needed)"}
    else:
        doc["labelled"] = report(vq.labelled, labels, confidence)  # type: ignore[arg-type]
    name, js, chance = vq.worst_drift()
    doc["drift"] = {"samples": vq.window_samples, "worst_signal": name, "js": js,
                    "chance": chance, "metric": "jensen-shannon distance (base 2)",
                    "signals": vq.drift()}
    est = vq.estimate
    interval = wilson(vq.estimate_above, vq.estimate_n, confidence)
    doc["estimate"] = {"is_estimate": True, "method": _method_name(vq.estimate_methods),
                       "accuracy": est, "samples": vq.estimate_n,
                       "ci": list(interval) if interval else None,
                       "reference_accuracy": vq.reference_accuracy,
                       "note": _estimate_note(est, name, js)}
    return doc


def _method_name(methods: set[str]) -> str:
    """What the pooled estimate is (devices of one version normally agree; a mix of agent
    releases can report both)."""
    names = sorted(ESTIMATE_METHODS.get(m, m) for m in methods) or ["none"]
    return " + ".join(names)


def _estimate_note(est: float | None, signal: str | None, js: float | None) -> str | None:
    if est is None:
        return "no estimate (no reference profile with labels, or no traffic)"
    if js is not None and js > ESTIMATE_DRIFT_WARNING:
        return (f"inputs drifted ({signal} JS {js:.2f}): under strong shift the estimate "
                "can be far off; confirm with labels")
    return None


def _n(c: Counts | None) -> int:
    return 0 if c is None else c.n


def f1_of(c: Counts | None) -> tuple[float | None, float | None]:
    if not isinstance(c, ClassCounts):
        return None, None
    return macro_f1(c)


def accuracy_of(c: Counts | None) -> tuple[float | None, float | None]:
    if not isinstance(c, ClassCounts) or c.n == 0:
        return None, None
    return c.correct / c.n, proportion_se(c.correct, c.n)


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def model_view(window_reports: Sequence[QualityReport],
               labelled_reports: Sequence[QualityReport], labels: Sequence[str] = (), *,
               confidence: float = 0.95, min_labelled: int = MIN_LABELLED
               ) -> dict[str, Any]:
    """Every version seen in the reports, each with :func:`summary` (newest first).
    ``window_reports``: each device's latest window per version; ``labelled_reports``: each
    device's latest report (its labelled counts cover its latest versions)."""
    versions = {r.version for r in window_reports}
    for r in labelled_reports:
        versions.update(int(v) for v in (r.doc.get("labelled") or {}) if str(v).isdigit())
    return {"versions": {str(v): summary(version_quality(window_reports, labelled_reports, v),
                                         labels, confidence=confidence,
                                         min_labelled=min_labelled)
                         for v in sorted(versions, reverse=True)},
            "confidence": confidence, "min_labelled": min_labelled}


def table_rows(view: Mapping[str, Any]) -> list[dict[str, str]]:
    """One row per version for a terminal table: numbers with their sample counts and
    intervals, "too few labels" instead of a number, the estimate marked as one."""
    rows = []
    for version, doc in view["versions"].items():
        lab, est, drift = doc["labelled"], doc["estimate"], doc["drift"]
        row = {"version": f"v{version}", "devices": str(doc["devices"]),
               "labels": str(lab["samples"])}
        if "accuracy" in lab and lab.get("accuracy") is not None:
            row["accuracy"] = share_ci(lab, "accuracy")
            row["precision"] = share_ci(lab, "precision_macro")
            row["recall"] = share_ci(lab, "recall_macro")
            row["f1"] = f1_ci(lab) + macro_note(lab)
        elif "mae" in lab and lab.get("mae") is not None:
            row["accuracy"] = f"MAE {lab['mae']:.4g}, RMSE {lab['rmse']:.4g}"
        else:
            row["accuracy"] = lab.get("note", "-")
        row["estimated accuracy"] = "-" if est["accuracy"] is None else \
            f"~{est['accuracy']:.1%} (estimate, n={est['samples']})" + \
            (" unreliable: inputs drifted" if est.get("note") else "")
        row["drift (JS)"] = "-" if drift["js"] is None else \
            f"{drift['js']:.3f} {drift['worst_signal']} (chance {drift['chance'] or 0:.3f})"
        rows.append(row)
    return rows

