"""The registry's quality reports (table ``quality_reports``, migration 0005): one row per
device, model and telemetry record, written with the telemetry; the reads the rollout
gates, the dashboard, the CLI and ``/metrics`` use. Pooling and judging are pure
(``fleet.quality``, ``fleet.quality_gates``)."""

from __future__ import annotations

import json
import math
from typing import Any, Iterable, Mapping

from sqlalchemy import func, select

from edgeship.fleet import schema as t
from edgeship.fleet.quality import (MIN_LABELLED, QualityReport, drift_max, model_view,
                                    reports_from_telemetry, version_quality)
from edgeship.fleet.quality_gates import QualityObservation

MAX_DOC_CHARS = 48_000  # the telemetry record is capped at 64 KB as a whole


def rows_of(device: str, ts: float, msg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows for ``quality_reports`` from one telemetry record (malformed parts skipped)."""
    out = []
    for r in reports_from_telemetry(device, ts, msg):
        doc = json.dumps(r.doc)
        if len(doc) > MAX_DOC_CHARS:
            continue
        js, signal = drift_max(r.doc)
        est = (r.drift or {}).get("estimate") or {}
        n, above = est.get("samples"), est.get("above")
        ok = all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31
                 for v in (n, above))
        out.append({"device": device, "ts": ts, "model": r.model, "version": r.version,
                    "samples": min(r.samples, 2**31 - 1),
                    "drift_js": js if js is not None and math.isfinite(js) else None,
                    "drift_signal": signal, "est_n": n if ok else 0,
                    "est_above": above if ok else 0, "doc": doc})
    return out


class QualityStore:
    """Reads over the registry's database (``fleet.db.Database``); the registry writes
    the rows with the telemetry (:func:`rows_of`)."""

    def __init__(self, db: Any) -> None:
        self.db = db

    def _reports(self, stmt: Any) -> list[QualityReport]:
        with self.db.read() as conn:
            rows = conn.execute(stmt).all()
        return [QualityReport(d, ts, m, v, json.loads(doc)) for d, ts, m, v, doc in rows]

    def _latest_per_device(self, *where: Any) -> list[QualityReport]:
        c = t.quality_reports.c
        newest = select(func.max(c.id)).where(*where).group_by(c.device)
        return self._reports(select(c.device, c.ts, c.model, c.version, c.doc)
                             .where(c.id.in_(newest)))

    def windows(self, model: str, version: int, since: float,
                devices: Iterable[str] | None = None) -> list[QualityReport]:
        """Each device's latest report of ``version`` since ``since`` (its window)."""
        c = t.quality_reports.c
        found = self._latest_per_device(c.model == model, c.version == version,
                                        c.ts >= since)
        return _only(found, devices)

    def latest(self, model: str, devices: Iterable[str] | None = None
               ) -> list[QualityReport]:
        """Each device's latest report of ``model`` (its cumulative labelled counts)."""
        found = self._latest_per_device(t.quality_reports.c.model == model)
        return _only(found, devices)

    def series(self, model: str, since: float, bucket_s: float = 10.0,
               devices: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Per version and time bucket: the sample-weighted mean of the largest drift per
        report, and the pooled estimate (for the dashboard's drift over time)."""
        c = t.quality_reports.c
        with self.db.read() as conn:
            rows = conn.execute(select(c.device, c.version, c.ts, c.samples, c.drift_js,
                                       c.est_n, c.est_above)
                                .where(c.model == model, c.ts >= since)).all()
        wanted = None if devices is None else set(devices)
        buckets: dict[tuple[int, int], list[float]] = {}
        for device, version, ts, samples, js, n, above in rows:
            if wanted is not None and device not in wanted:
                continue
            b = buckets.setdefault((version, int(ts // bucket_s)), [0.0, 0.0, 0, 0])
            if js is not None and samples:
                b[0] += js * samples
                b[1] += samples
            b[2] += n
            b[3] += above
        return [{"version": v, "ts": k * bucket_s,
                 "drift_js": s / w if w else None,
                 "estimated_accuracy": above / n if n else None, "estimate_samples": n}
                for (v, k), (s, w, n, above) in sorted(buckets.items(), key=lambda i: i[0][::-1])]

    # --- what the runner and the views need ------------------------------------------------

    def observation(self, model: str, new_version: int, old_version: int | None,
                    wave: Iterable[str], since: float, baseline_since: float
                    ) -> QualityObservation | None:
        """The wave's new version (its devices, since ``since``) beside the previous
        version (every device's window since ``baseline_since``; labelled counts from all
        devices); None when nothing was reported."""
        wave = list(wave)
        latest = self.latest(model)
        new = version_quality(self.windows(model, new_version, since, wave),
                              [r for r in latest if r.device in set(wave)], new_version)
        if not new.devices and new.labelled is None:
            return None
        old = None if old_version is None else version_quality(
            self.windows(model, old_version, baseline_since), latest, old_version)
        return QualityObservation(new, old)

    def view(self, model: str, since: float, labels: tuple[str, ...] = (),
             devices: Iterable[str] | None = None, **options: Any) -> dict[str, Any]:
        """Per version: labelled metrics, drift and the estimate (``fleet.quality``)."""
        devices = None if devices is None else list(devices)
        windows = []
        for version in self.versions(model):
            windows += self.windows(model, version, since, devices)
        return model_view(windows, self.latest(model, devices), labels, **options)

    def versions(self, model: str) -> list[int]:
        c = t.quality_reports.c
        with self.db.read() as conn:
            return [int(v) for v in conn.execute(
                select(c.version).where(c.model == model).distinct()).scalars()]

    def models(self) -> list[str]:
        c = t.quality_reports.c
        with self.db.read() as conn:
            return [str(m) for m in conn.execute(select(c.model).distinct()).scalars()]


def _only(reports: list[QualityReport], devices: Iterable[str] | None) -> list[QualityReport]:
    if devices is None:
        return reports
    wanted = set(devices)
    return [r for r in reports if r.device in wanted]


def cohort(registry: Any, group: str | None, tag: str | None,
           profile: str | None) -> list[str] | None:
    """Device ids of the cohort; None: every device."""
    if group is None and tag is None and profile is None:
        return None
    return [d.id for d in registry.devices(group=group, tag=tag)
            if profile is None or d.profile == profile]


def quality_doc(registry: Any, model: str, *, group: str | None = None,
                tag: str | None = None, profile: str | None = None, since_s: float = 3600,
                min_labelled: int = MIN_LABELLED) -> dict[str, Any]:
    devices = cohort(registry, group, tag, profile)
    now = registry.now()
    store = registry.quality
    latest = store.latest(model, devices)
    labels = next((tuple(r.doc["labels"]) for r in latest
                   if isinstance(r.doc.get("labels"), list)), ())
    doc = store.view(model, now - since_s, labels, devices, min_labelled=min_labelled)
    doc.update(model=model, cohort={"group": group, "tag": tag, "profile": profile},
               series=store.series(model, now - since_s, max(10.0, since_s / 60), devices))
    return doc
