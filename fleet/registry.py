"""The fleet registry: devices (inventory, tags, group), what they report (status events,
telemetry, per-model serving numbers), releases, per-device desired state, rollouts, API
tokens and an audit log.

SQLite is the embedded default; PostgreSQL is the scale option (pass a ``postgresql://``
URL instead of a path). Both run the same SQLAlchemy Core statements on the schema of
:mod:`fleet.schema` (see :mod:`fleet.db`). Messages are stored as received (``raw``) next
to the few fields the fleet queries. Tables that grow with traffic are pruned to
``max_*_rows``. Reads live in :mod:`fleet.registry_reads`.

What a device *runs* comes only from its own reports (retained presence, ``serving``
events), never from what the fleet asked for: a device that rolls back on its own shows
the version it really serves, next to its desired one.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from sqlalchemy import and_, case, func, or_, select

from edgeship.agent.protocol import StatusEvent
from edgeship.fleet import schema as t
from edgeship.fleet.db import Database
from edgeship.fleet.quality_store import QualityStore
from edgeship.fleet.quality_store import rows_of as quality_rows
from edgeship.fleet.registry_reads import (DesiredRecord, DeviceRecord, EventRecord,
                                           RegistryReads, VersionStats)

logger = logging.getLogger(__name__)

__all__ = ["Registry", "RegistrySettings", "DeviceRecord", "EventRecord", "DesiredRecord",
           "VersionStats", "presence_online", "model_stat_rows", "vitals"]

FAILURE_EVENTS = (StatusEvent.FAILED, StatusEvent.REJECTED)


@dataclass(frozen=True)
class RegistrySettings:
    max_event_rows: int = 200_000
    max_telemetry_rows: int = 200_000
    prune_every: int = 1000  # inserts between prunes
    busy_timeout_s: float = 5.0
    pool_size: int = 8  # connections kept open (PostgreSQL; SQLite readers)


def _str_or_none(value: Any, limit: int = 1024) -> str | None:
    return None if value is None else str(value)[:limit]


def _int_or_none(value: Any) -> int | None:
    """An integer a BIGINT column holds, else None (a 5,000-digit version is not one)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and -2**63 <= value < 2**63
    return value if ok else None


def _num_or_none(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if ok and math.isfinite(value) else None


def presence_online(msg: dict[str, Any]) -> bool:
    """Presence says ``"online": bool`` (or ``"state": "online"|"offline"``)."""
    if isinstance(msg.get("online"), bool):
        return msg["online"]
    return msg.get("state") == "online"


def model_stat_rows(msg: dict[str, Any]) -> list[tuple]:
    """(model, version, requests, errors, p50, p95, agreement) from a telemetry batch."""
    rows = []
    models = msg.get("models")
    for name, m in (models.items() if isinstance(models, dict) else ()):
        if not isinstance(m, dict) or _int_or_none(m.get("version")) is None:
            continue
        lat = m.get("latency_ms") if isinstance(m.get("latency_ms"), dict) else {}
        # agreement: the agent reports shadow runs in ``shadow_result`` status events,
        # not in telemetry (see shadow_results); the column stays for old registries
        rows.append((str(name)[:64], m["version"], _int_or_none(m.get("requests")) or 0,
                     _int_or_none(m.get("errors")) or 0, _num_or_none(lat.get("p50")),
                     _num_or_none(lat.get("p95")), None))
    return rows


def vitals(msg: dict[str, Any]) -> tuple[float | None, float | None, float | None]:
    """(CPU %, memory used %, temperature °C) from a telemetry batch's ``system`` sample
    (``agent.telemetry.DeviceSampler``); None for what it does not say."""
    system = msg.get("system") if isinstance(msg.get("system"), dict) else {}
    memory = system.get("memory") if isinstance(system.get("memory"), dict) else {}
    mem = _num_or_none(memory.get("used_percent"))
    total, avail = _num_or_none(memory.get("total_mb")), _num_or_none(memory.get("available_mb"))
    if mem is None and total and avail is not None:
        mem = 100.0 * (1 - avail / total)
    return (_num_or_none(system.get("cpu_percent")), mem,
            _num_or_none(system.get("temperature_c")))


class _Rows:
    """Rows of a batch of reports grouped by statement: each group is executed once with
    all its rows (one round trip with psycopg's pipeline, one ``executemany`` on SQLite),
    in the order the groups were first used; ``serving`` notes run after them."""

    def __init__(self) -> None:
        self.groups: dict[tuple, tuple[Any, list[dict[str, Any]]]] = {}
        self.serving: list[tuple[str, str, dict[str, Any]]] = []

    def add(self, key: tuple, statement: Any, row: dict[str, Any]) -> None:
        if key not in self.groups:
            self.groups[key] = (statement(), [])
        self.groups[key][1].append(row)

    def execute(self, conn: Any) -> None:
        for stmt, rows in self.groups.values():
            conn.execute(stmt, rows)


class Registry(RegistryReads):
    def __init__(self, target: str | Path, settings: RegistrySettings = RegistrySettings(),
                 clock=time.time) -> None:
        self.target = target
        self.settings = settings
        self._clock = clock
        self._inserts = 0
        self.db = Database(target, busy_timeout_s=settings.busy_timeout_s,
                           pool_size=settings.pool_size)
        self.quality = QualityStore(self.db)
        self._epoch: int | None = None

    @property
    def epoch(self) -> int:
        """This registry's epoch, fixed the first time it is asked for (by the first fleet
        server that publishes a desired state): then-time in ms. Desired states carry it,
        so a recreated registry outranks the one it replaced."""
        if self._epoch is None:
            self._epoch = self._read_epoch()
        return self._epoch

    def _read_epoch(self) -> int:
        with self.db.write() as conn:
            conn.execute(self.db.upsert(t.meta, {"key": "epoch", "value": str(
                max(1, int(self._clock() * 1000)))}, ["key"]))
            return int(conn.execute(select(t.meta.c.value).where(
                t.meta.c.key == "epoch")).scalar_one())

    def now(self) -> float:
        """The registry's clock (what its timestamps are in)."""
        return self._clock()

    @property
    def backend(self) -> str:
        return self.db.dialect

    def close(self) -> None:
        self.db.close()

    # --- what devices report ---------------------------------------------------------------

    def add_reports(self, reports: list[tuple[str, str, dict[str, Any]]]) -> int:
        """Store many device reports, ``(kind, device, message)`` with kind ``presence``,
        ``status`` or ``telemetry``, in one transaction with one multi-row statement per
        kind of row (the fleet server's writer batches what arrives while it writes). A
        batch that fails is written one report at a time, so one bad report loses only
        itself. Returns how many were stored."""
        try:
            self._store(reports)
            stored = len(reports)
        except Exception:
            logger.warning("a batch of %d reports failed; storing them one by one",
                           len(reports), exc_info=True)
            stored = 0
            for report in reports:
                try:
                    self._store([report])
                    stored += 1
                except Exception:
                    logger.exception("could not store a %s report of %s", *report[:2])
        self._maybe_prune(stored)
        return stored

    def _store(self, reports: list[tuple[str, str, dict[str, Any]]]) -> None:
        rows = _Rows()
        add = {"presence": self._presence, "status": self._event,
               "telemetry": self._telemetry}
        for kind, device, msg in reports:
            add[kind](rows, device, msg, self._clock())
        with self.db.write() as conn:
            rows.execute(conn)
            for device, model, entry in rows.serving:
                self._note_serving(conn, device, model, entry)

    def upsert_presence(self, device: str, msg: dict[str, Any]) -> None:
        self.add_reports([("presence", device, msg)])

    def add_event(self, device: str, msg: dict[str, Any]) -> None:
        self.add_reports([("status", device, msg)])

    def add_telemetry(self, device: str, msg: dict[str, Any]) -> None:
        self.add_reports([("telemetry", device, msg)])

    def _touch(self, rows: "_Rows", device: str, now: float, **columns: Any) -> None:
        """Create the device if new; set ``last_seen`` (and ``columns``)."""
        cols = tuple(sorted(columns))
        rows.add(("touch", cols), lambda: self.db.upsert(t.devices, None, ["id"],
                                                         ["last_seen", *cols]),
                 {"id": device, "last_seen": now, **columns})

    def _presence(self, rows: "_Rows", device: str, msg: dict[str, Any], now: float) -> None:
        d = t.devices.c
        keep = {k: (lambda x, k=k: func.coalesce(x[k], d[k]))
                for k in ("profile", "agent_version", "arch")}
        rows.add(("presence",), lambda: self.db.upsert(t.devices, None, ["id"], {
            "online": lambda x: x.online, "last_seen": lambda x: x.last_seen, **keep,
            "models": lambda x: case((x.models == "null", d.models), else_=x.models)}),
            {"id": device, "online": int(presence_online(msg)), "last_seen": now,
             "profile": _str_or_none(msg.get("profile")),
             "agent_version": _str_or_none(msg.get("agent_version")),
             "arch": _str_or_none(msg.get("arch"), 64), "models": json.dumps(msg.get("models"))})

    def _event(self, rows: "_Rows", device: str, msg: dict[str, Any], now: float) -> None:
        event = _str_or_none(msg.get("event"), 64)
        reason = _str_or_none(msg.get("reason"), 64)
        extra: dict[str, Any] = {"last_event": event, "last_event_ts": now}
        if event in FAILURE_EVENTS:
            extra.update(last_failure=reason or event, last_failure_ts=now,
                         last_failure_detail=_str_or_none(msg.get("detail")))
        self._touch(rows, device, now, **extra)
        rows.add(("events",), t.events.insert, {
            "device": device, "ts": now, "event": event, "model": _str_or_none(msg.get("model")),
            "version": _int_or_none(msg.get("version")), "reason": reason,
            "detail": _str_or_none(msg.get("detail")), "raw": json.dumps(msg)})
        if event == StatusEvent.SERVING and isinstance(msg.get("model"), str):
            rows.serving.append((device, msg["model"], {"version": msg.get("version"),
                                                        "variant": msg.get("variant")}))

    def _note_serving(self, conn, device: str, model: str, entry: dict[str, Any]) -> None:
        """A ``serving`` event updates what the device runs even before its presence."""
        raw = conn.execute(select(t.devices.c.models)
                           .where(t.devices.c.id == device)).scalar()
        models = json.loads(raw) if raw else None
        models = models if isinstance(models, dict) else {}
        models[model] = entry
        conn.execute(t.devices.update().where(t.devices.c.id == device)
                     .values(models=json.dumps(models)))

    def _telemetry(self, rows: "_Rows", device: str, msg: dict[str, Any], now: float) -> None:
        cpu, mem, temp = vitals(msg)
        seen = {} if cpu is None and mem is None and temp is None else {
            "cpu_percent": cpu, "memory_percent": mem, "temperature_c": temp, "vitals_ts": now}
        self._touch(rows, device, now, **seen)
        rows.add(("telemetry",), t.telemetry.insert,
                 {"device": device, "ts": now, "raw": json.dumps(msg)})
        keys = ("model", "version", "requests", "errors", "p50_ms", "p95_ms", "agreement")
        for r in model_stat_rows(msg):
            rows.add(("model_stats",), t.model_stats.insert,
                     {"device": device, "ts": now, **dict(zip(keys, r))})
        for q in quality_rows(device, now, msg):
            rows.add(("quality_reports",), t.quality_reports.insert, q)

    def add_release(self, model: str, version: int, released_at: float,
                    by: str | None = None) -> None:
        with self.db.write() as conn:
            conn.execute(self.db.upsert(t.releases, {"model": model, "version": version,
                                                     "released_at": released_at, "by": by},
                                        ["model", "version"], ["released_at", "by"]))

    def _maybe_prune(self, inserts: int = 1) -> None:
        before, self._inserts = self._inserts, self._inserts + inserts
        if before // self.settings.prune_every == self._inserts // self.settings.prune_every:
            return
        with self.db.write() as conn:
            for table, keep in ((t.events, self.settings.max_event_rows),
                                (t.telemetry, self.settings.max_telemetry_rows),
                                (t.model_stats, self.settings.max_telemetry_rows),
                                (t.quality_reports, self.settings.max_telemetry_rows)):
                newest = select(func.max(table.c.id)).scalar_subquery()
                conn.execute(table.delete().where(table.c.id <= newest - keep))

    # --- inventory: tags and groups --------------------------------------------------------

    def tag(self, device: str, add: Iterable[str] = (), remove: Iterable[str] = ()) -> None:
        add, remove = [str(x) for x in add], [str(x) for x in remove]
        with self.db.write() as conn:
            self._touch_if_missing(conn, device)
            for tag in add:
                conn.execute(self.db.upsert(t.device_tags, {"device": device, "tag": tag},
                                            ["device", "tag"]))
            if remove:
                conn.execute(t.device_tags.delete().where(and_(
                    t.device_tags.c.device == device, t.device_tags.c.tag.in_(remove))))

    def set_group(self, device: str, group: str | None) -> None:
        with self.db.write() as conn:
            self._touch_if_missing(conn, device)
            conn.execute(t.devices.update().where(t.devices.c.id == device)
                         .values(grp=group))

    def _touch_if_missing(self, conn, device: str) -> None:
        conn.execute(self.db.upsert(t.devices, {"id": device, "last_seen": self._clock()},
                                    ["id"]))

    # --- desired state ---------------------------------------------------------------------

    def set_desired(self, device: str, model: str, version: int,
                    rollout: str | None = None,
                    hold: bool = False) -> tuple[DesiredRecord, bool]:
        """Idempotent: asking again for the current desired version (and ``hold``) changes
        nothing (same ``seq``); anything else gets the next fleet-wide ``seq``. ``hold``:
        stage and health-check, do not switch (all-or-none). Returns the record and
        whether it changed."""
        c = t.desired.c
        with self.db.write() as conn:
            if conn.dialect.name == "postgresql":  # seq = MAX + 1 must not race
                conn.execute(select(func.pg_advisory_xact_lock(7461002)))
            row = conn.execute(select(c.version, c.seq, c.rollout, c.updated_at, c.hold)
                               .where(c.device == device, c.model == model)).first()
            if row is not None and row.version == version and bool(row.hold) == hold:
                return DesiredRecord(device, model, version, row.seq, row.rollout,
                                     row.updated_at, hold), False
            seq = conn.execute(select(func.coalesce(func.max(c.seq), 0) + 1)).scalar()
            now = self._clock()
            values = {"device": device, "model": model, "version": version, "seq": seq,
                      "rollout": rollout, "updated_at": now, "hold": int(hold)}
            conn.execute(self.db.upsert(t.desired, values, ["device", "model"],
                                        ["version", "seq", "rollout", "updated_at", "hold"]))
            return DesiredRecord(device, model, version, seq, rollout, now, hold), True

    # --- leases: one rollout runner per registry ------------------------------------------

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take or renew lease ``name`` for ``holder`` until now + ``ttl_s``; True when
        ``holder`` has it. Another holder gets it only once it has expired (one atomic
        upsert, so two processes can never both succeed)."""
        now = self._clock()
        c = t.leases.c
        with self.db.write() as conn:
            conn.execute(self.db.upsert(
                t.leases, {"name": name, "holder": holder, "expires_at": now + ttl_s},
                ["name"], ["holder", "expires_at"],
                where=lambda x: or_(c.holder == x.holder, c.expires_at < now)))
            held = conn.execute(select(c.holder).where(c.name == name)).scalar()
        return held == holder

    def release_lease(self, name: str, holder: str) -> None:
        with self.db.write() as conn:
            conn.execute(t.leases.delete().where(t.leases.c.name == name,
                                                 t.leases.c.holder == holder))

    # --- fleet servers sharing this registry (see fleet.membership) ------------------------

    def join_member(self, member: str, ttl_s: float) -> float:
        """(Re)join as a live fleet server from now on; returns ``since``."""
        now = self._clock()
        with self.db.write() as conn:
            conn.execute(self.db.upsert(
                t.fleet_members, {"id": member, "since": now, "leaves_at": None,
                                  "expires_at": now + ttl_s},
                ["id"], ["since", "leaves_at", "expires_at"]))
        return now

    def renew_member(self, member: str, ttl_s: float) -> bool:
        """Push ``member``'s expiry to now + ``ttl_s``; False when its row is gone."""
        c = t.fleet_members.c
        with self.db.write() as conn:
            done = conn.execute(t.fleet_members.update().where(c.id == member)
                                .values(expires_at=self._clock() + ttl_s))
        return done.rowcount > 0

    def leave_member(self, member: str, leaves_at: float) -> None:
        with self.db.write() as conn:
            conn.execute(t.fleet_members.update().where(t.fleet_members.c.id == member)
                         .values(leaves_at=leaves_at))

    def members(self, forget_after_s: float = 3600.0) -> list[tuple[str, float, float | None,
                                                                    float]]:
        """(id, since, leaves_at, expires_at) of every fleet server seen lately."""
        c = t.fleet_members.c
        with self.db.write() as conn:
            conn.execute(t.fleet_members.delete().where(
                c.expires_at < self._clock() - forget_after_s))
            rows = conn.execute(select(c.id, c.since, c.leaves_at, c.expires_at)
                                .order_by(c.id)).all()
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    # --- fleet-wide announcements (re-sent to devices that come back online) ---------------

    def note_announcement(self, model: str, version: int, released_at: float,
                          spread_s: float = 0.0) -> None:
        """Remember the newest announced version of ``model`` (an older one never wins)."""
        c = t.announcements.c
        with self.db.write() as conn:
            conn.execute(self.db.upsert(
                t.announcements, {"model": model, "version": version,
                                  "released_at": released_at, "spread_s": spread_s},
                ["model"], ["version", "released_at", "spread_s"],
                where=lambda x: c.version <= x.version))

    # --- rollouts and audit ----------------------------------------------------------------

    def save_rollout(self, rollout_id: str, model: str, state: str,
                     doc: dict[str, Any]) -> None:
        now = self._clock()
        row = {"id": rollout_id, "model": model, "state": state, "created_at": now,
               "updated_at": now, "doc": json.dumps(doc)}
        with self.db.write() as conn:
            conn.execute(self.db.upsert(t.rollouts, row, ["id"],
                                        ["state", "updated_at", "doc"]))

    def audit(self, actor: str | None, action: str, rollout: str | None = None,
              token: str | None = None, **detail: Any) -> None:
        """One audit row: who (``actor``; ``token``: the API token's id), what, why."""
        with self.db.write() as conn:
            conn.execute(t.audit.insert().values(
                ts=self._clock(), actor=actor, action=action, rollout=rollout, token=token,
                detail=json.dumps(detail, default=str)))
