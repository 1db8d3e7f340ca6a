"""Reads of the fleet registry (:class:`fleet.registry.Registry` inherits them): devices,
one page of devices for the dashboard (filtered, sorted and paged in SQL), reports,
serving numbers, rollouts and the audit log."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable

from sqlalchemy import case, func, select

from edgeship.agent.protocol import StatusEvent
from edgeship.agent.errors import ConfigError
from edgeship.fleet import schema as t


@dataclass(frozen=True)
class DeviceRecord:
    id: str
    online: bool
    last_seen: float
    profile: str | None
    agent_version: str | None
    models: Any  # what the device last reported it runs (JSON)
    last_event: str | None = None
    last_event_ts: float | None = None
    arch: str | None = None
    group: str | None = None
    tags: tuple[str, ...] = ()
    desired: dict[str, int] = field(default_factory=dict)  # model -> desired version
    last_failure: str | None = None      # reason of the last failed/rejected event
    last_failure_ts: float | None = None
    cpu_percent: float | None = None     # from the last telemetry that had a system sample
    memory_percent: float | None = None
    temperature_c: float | None = None
    vitals_ts: float | None = None

    def running(self, model: str) -> int | None:
        """The version of ``model`` the device last said it serves."""
        entry = self.models.get(model) if isinstance(self.models, dict) else None
        if isinstance(entry, dict):
            entry = entry.get("version")
        return entry if isinstance(entry, int) else None

    def to_dict(self) -> dict[str, Any]:
        doc = {k: getattr(self, k) for k in self.__dataclass_fields__}
        doc["tags"] = list(self.tags)
        return doc


@dataclass(frozen=True)
class EventRecord:
    device: str
    ts: float
    event: str | None
    model: str | None
    version: int | None
    reason: str | None
    detail: str | None
    raw: dict[str, Any]


@dataclass(frozen=True)
class DesiredRecord:
    device: str
    model: str
    version: int
    seq: int
    rollout: str | None
    updated_at: float
    hold: bool = False  # all-or-none: stage and health-check, wait for the commit


@dataclass(frozen=True)
class VersionStats:
    """Serving numbers of one model version on one device, summed over a time window."""

    requests: int = 0
    errors: int = 0
    p50_ms: float | None = None  # request-weighted mean of the reported medians
    agreement: float | None = None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None


SORTS = {"id": "id", "last_seen": "last_seen", "profile": "profile", "online": "online",
         "cpu": "cpu_percent", "memory": "memory_percent", "temperature": "temperature_c",
         "failure": "last_failure_ts"}
MAX_PAGE = 1000


@dataclass(frozen=True)
class DeviceQuery:
    """One page of the devices table: filters, sort, offset and limit (all in SQL)."""

    search: str | None = None      # substring of the device id
    online: bool | None = None
    profile: str | None = None
    group: str | None = None
    tag: str | None = None
    failing: bool = False          # only devices whose last failure is known
    sort: str = "id"
    descending: bool = False
    offset: int = 0
    limit: int = 50

    def __post_init__(self) -> None:
        if self.sort not in SORTS:
            raise ConfigError(f"sort {self.sort!r}: one of {', '.join(SORTS)}", key="sort")
        if not 0 <= self.offset or not 1 <= self.limit <= MAX_PAGE:
            raise ConfigError(f"offset >= 0 and limit in [1, {MAX_PAGE}]", key="limit")

    def where(self) -> list[Any]:
        c = t.devices.c
        conds = []
        if self.search:
            pattern = self.search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            conds.append(c.id.like(f"%{pattern}%", escape="\\"))
        if self.online is not None:
            conds.append(c.online == int(self.online))
        for col, value in ((c.profile, self.profile), (c.grp, self.group)):
            if value is not None:
                conds.append(col == value)
        if self.tag is not None:
            conds.append(c.id.in_(select(t.device_tags.c.device)
                                  .where(t.device_tags.c.tag == self.tag)))
        if self.failing:
            conds.append(c.last_failure.is_not(None))
        return conds


_DEVICE_COLS = ("id", "online", "last_seen", "profile", "agent_version", "models",
                "last_event", "last_event_ts", "arch", "grp", "last_failure",
                "last_failure_ts", "cpu_percent", "memory_percent", "temperature_c",
                "vitals_ts")


class RegistryReads:
    db: Any  # fleet.db.Database, set by Registry

    def _rows(self, stmt: Any) -> list[Any]:
        with self.db.read() as conn:
            return conn.execute(stmt).all()

    # --- devices ---------------------------------------------------------------------------

    def devices(self, group: str | None = None, tag: str | None = None) -> list[DeviceRecord]:
        return self._records(DeviceQuery(group=group, tag=tag, limit=MAX_PAGE), paged=False)

    def device_page(self, query: DeviceQuery) -> tuple[int, list[DeviceRecord]]:
        """(devices matching the filters, the requested page of them)."""
        total = self._rows(select(func.count()).select_from(t.devices)
                           .where(*query.where()))[0][0]
        return total, self._records(query, paged=True)

    def _records(self, query: DeviceQuery, paged: bool) -> list[DeviceRecord]:
        col = t.devices.c[SORTS[query.sort]]
        order = [col.desc() if query.descending else col.asc(), t.devices.c.id.asc()]
        stmt = select(*(t.devices.c[n] for n in _DEVICE_COLS)).where(*query.where()) \
            .order_by(*order)
        if paged:
            stmt = stmt.offset(query.offset).limit(query.limit)
        rows = self._rows(stmt)
        ids = [r.id for r in rows] if paged else None
        tags, desired = self._tags(ids), self._desired_by_device(ids)
        return [DeviceRecord(r.id, bool(r.online), r.last_seen, r.profile, r.agent_version,
                             json.loads(r.models), r.last_event, r.last_event_ts, r.arch,
                             r.grp, tuple(tags.get(r.id, ())), desired.get(r.id, {}),
                             *r[10:]) for r in rows]

    def _tags(self, ids: list[str] | None) -> dict[str, list[str]]:
        stmt = select(t.device_tags.c.device, t.device_tags.c.tag).order_by(t.device_tags.c.tag)
        if ids is not None:
            stmt = stmt.where(t.device_tags.c.device.in_(ids))
        tags: dict[str, list[str]] = {}
        for dev, tag in self._rows(stmt):
            tags.setdefault(dev, []).append(tag)
        return tags

    def _desired_by_device(self, ids: list[str] | None) -> dict[str, dict[str, int]]:
        c = t.desired.c
        stmt = select(c.device, c.model, c.version)
        if ids is not None:
            stmt = stmt.where(c.device.in_(ids))
        desired: dict[str, dict[str, int]] = {}
        for dev, model, version in self._rows(stmt):
            desired.setdefault(dev, {})[model] = version
        return desired

    def offline_since(self, ids: Iterable[str]) -> dict[str, float]:
        """Offline devices among ``ids`` -> when each was last seen."""
        wanted = set(ids)
        rows = self._rows(select(t.devices.c.id, t.devices.c.last_seen)
                          .where(t.devices.c.online == 0))
        return {d: seen for d, seen in rows if d in wanted}

    def fleet_summary(self) -> dict[str, Any]:
        """Counts for the dashboard's header: devices, online, per profile, per version
        running (grouped in SQL by the reported ``models`` text: few distinct values)."""
        c = t.devices.c
        total, online = self._rows(select(func.count(), func.coalesce(func.sum(c.online), 0))
                                   .select_from(t.devices))[0]
        profiles = {p or "": n for p, n in self._rows(
            select(c.profile, func.count()).group_by(c.profile))}
        running: dict[str, int] = {}
        for models, n in self._rows(select(c.models, func.count()).group_by(c.models)):
            entries = json.loads(models)
            for name, entry in (entries.items() if isinstance(entries, dict) else ()):
                version = entry.get("version") if isinstance(entry, dict) else entry
                key = f"{name} v{version}" if version is not None else f"{name} (unknown)"
                running[key] = running.get(key, 0) + n
        failing = self._rows(select(func.count()).select_from(t.devices)
                             .where(c.last_failure.is_not(None)))[0][0]
        return {"devices": total, "online": int(online), "profiles": profiles,
                "running": dict(sorted(running.items())), "failing": failing}

    def desired(self, device: str | None = None,
                model: str | None = None) -> list[DesiredRecord]:
        c = t.desired.c
        stmt = select(c.device, c.model, c.version, c.seq, c.rollout, c.updated_at, c.hold)
        if device is not None:
            stmt = stmt.where(c.device == device)
        if model is not None:
            stmt = stmt.where(c.model == model)
        rows = self._rows(stmt.order_by(c.device, c.model))
        return [DesiredRecord(*r[:6], bool(r[6])) for r in rows]

    def lease(self, name: str) -> tuple[str, float] | None:
        """(holder, expires_at) of lease ``name``, expired or not; None when free."""
        rows = self._rows(select(t.leases.c.holder, t.leases.c.expires_at)
                          .where(t.leases.c.name == name))
        return (rows[0][0], rows[0][1]) if rows else None

    # --- reports ---------------------------------------------------------------------------

    def events(self, device: str | None = None, since: float | None = None,
               limit: int = 1000) -> list[EventRecord]:
        c = t.events.c
        stmt = select(c.device, c.ts, c.event, c.model, c.version, c.reason, c.detail, c.raw)
        if device is not None:
            stmt = stmt.where(c.device == device)
        if since is not None:
            stmt = stmt.where(c.ts >= since)
        rows = self._rows(stmt.order_by(c.id).limit(int(limit)))
        return [EventRecord(*r[:7], raw=json.loads(r[7])) for r in rows]

    def install_outcomes(self, model: str, version: int, since: float,
                         events: tuple[StatusEvent, ...] = (StatusEvent.SERVING,
                                                            StatusEvent.FAILED),
                         ) -> dict[str, tuple[str, str | None]]:
        """device -> (last of ``events``, reason) for one model version; all-or-none
        staging asks for ``(HELD, FAILED)``."""
        c = t.events.c
        rows = self._rows(select(c.device, c.event, c.reason).where(
            c.model == model, c.version == version, c.ts >= since, c.event.in_([str(e) for e in events]))
            .order_by(c.id))
        return {r[0]: (r[1], r[2]) for r in rows}

    def shadow_results(self, model: str, version: int,
                       since: float) -> dict[str, dict[str, Any]]:
        """device -> the ``shadow`` field of its last ``shadow_result`` status event for
        one model version: exactly what the agent's shadow run reported
        (``agent.shadow.ShadowRun.summary``)."""
        c = t.events.c
        rows = self._rows(select(c.device, c.raw).where(
            c.model == model, c.version == version, c.ts >= since,
            c.event == StatusEvent.SHADOW_RESULT.value).order_by(c.id))
        results = {}
        for device, raw in rows:
            shadow = json.loads(raw).get("shadow")
            if isinstance(shadow, dict):
                results[device] = shadow
        return results

    def version_stats(self, model: str, version: int,
                      since: float) -> dict[str, VersionStats]:
        """device -> its summed serving numbers for ``model`` ``version`` since ``since``."""
        c = t.model_stats.c
        weighted = func.sum(c.p50_ms * c.requests) / func.nullif(
            func.sum(case((c.p50_ms.is_(None), 0), else_=c.requests)), 0)
        rows = self._rows(select(c.device, func.sum(c.requests), func.sum(c.errors),
                                 weighted, func.avg(c.agreement))
                          .where(c.model == model, c.version == version, c.ts >= since)
                          .group_by(c.device))
        return {r[0]: VersionStats(int(r[1] or 0), int(r[2] or 0),
                                   None if r[3] is None else float(r[3]), r[4]) for r in rows}

    def version_series(self, model: str, since: float,
                       bucket_s: float = 10.0) -> list[dict[str, Any]]:
        """Per version and time bucket: requests, errors, mean p50 (for the dashboard)."""
        c = t.model_stats.c
        bucket = func.floor(c.ts / float(bucket_s))
        rows = self._rows(select(c.version, bucket, func.sum(c.requests), func.sum(c.errors),
                                 func.avg(c.p50_ms))
                          .where(c.model == model, c.ts >= since)
                          .group_by(c.version, bucket).order_by(bucket, c.version))
        return [{"version": r[0], "ts": float(r[1]) * bucket_s, "requests": int(r[2] or 0),
                 "errors": int(r[3] or 0), "p50_ms": r[4]} for r in rows]

    def latest_telemetry(self, device: str) -> dict[str, Any] | None:
        c = t.telemetry.c
        rows = self._rows(select(c.raw).where(c.device == device).order_by(c.id.desc())
                          .limit(1))
        return json.loads(rows[0][0]) if rows else None

    def releases(self, model: str | None = None) -> list[tuple[str, int, float, str | None]]:
        c = t.releases.c
        stmt = select(c.model, c.version, c.released_at, c.by)
        if model is not None:
            stmt = stmt.where(c.model == model)
        return [tuple(r) for r in self._rows(stmt.order_by(c.model, c.version))]

    def announcements(self) -> list[tuple[str, int, float, float]]:
        """(model, version, released_at, spread_s) of the newest announcement per model."""
        c = t.announcements.c
        return [(r[0], r[1], r[2], r[3]) for r in self._rows(
            select(c.model, c.version, c.released_at, c.spread_s).order_by(c.model))]

    # --- rollouts and audit ----------------------------------------------------------------

    def rollout(self, rollout_id: str) -> dict[str, Any] | None:
        rows = self._rows(select(t.rollouts.c.doc).where(t.rollouts.c.id == rollout_id))
        return json.loads(rows[0][0]) if rows else None

    def rollouts(self, states: Iterable[str] | None = None) -> list[dict[str, Any]]:
        c = t.rollouts.c
        stmt = select(c.doc).order_by(c.created_at, c.id)
        if states is not None:
            stmt = stmt.where(c.state.in_(list(states)))
        return [json.loads(r[0]) for r in self._rows(stmt)]

    def audit_log(self, rollout: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        c = t.audit.c
        stmt = select(c.ts, c.actor, c.action, c.rollout, c.detail, c.token)
        if rollout is not None:
            stmt = stmt.where(c.rollout == rollout)
        rows = self._rows(stmt.order_by(c.id.desc()).limit(int(limit)))
        return [{"ts": r[0], "actor": r[1], "action": r[2], "rollout": r[3],
                 **json.loads(r[4]), **({"token": r[5]} if r[5] else {})}
                for r in reversed(rows)]
