"""The fleet registry: devices (inventory, tags, group), what they report (status events,
telemetry, per-model serving numbers), releases, per-device desired state, rollouts and an
audit log.

SQLite is the embedded default (WAL mode, so ``fleet status`` can read while the server
writes); PostgreSQL is the scale option: pass a ``postgresql://`` URL instead of a path.
Both run the same schema and the same queries (see :mod:`fleet.db`). Messages are stored as
received (``raw``) next to the few fields the fleet queries. Tables that grow with traffic
are pruned to ``max_*_rows``.

What a device *runs* comes only from its own reports (retained presence, ``serving``
events), never from what the fleet asked for: a device that rolls back on its own shows
the version it really serves, next to its desired one.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from edgeship.agent.protocol import StatusEvent
from edgeship.fleet.db import open_backend
from edgeship.fleet.quality_store import SCHEMA as QUALITY_SCHEMA
from edgeship.fleet.quality_store import QualityStore

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY, online INTEGER NOT NULL DEFAULT 0, last_seen {real} NOT NULL,
    profile TEXT, agent_version TEXT, arch TEXT, grp TEXT,
    models TEXT NOT NULL DEFAULT 'null');
CREATE TABLE IF NOT EXISTS device_tags (
    device TEXT NOT NULL, tag TEXT NOT NULL, PRIMARY KEY (device, tag));
CREATE TABLE IF NOT EXISTS events (
    id {serial}, device TEXT NOT NULL, ts {real} NOT NULL,
    event TEXT, model TEXT, version INTEGER, reason TEXT, detail TEXT, raw TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_device_ts ON events (device, ts);
CREATE INDEX IF NOT EXISTS events_model_version ON events (model, version, event);
CREATE TABLE IF NOT EXISTS telemetry (
    id {serial}, device TEXT NOT NULL, ts {real} NOT NULL, raw TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS telemetry_device_ts ON telemetry (device, ts);
CREATE TABLE IF NOT EXISTS model_stats (
    id {serial}, device TEXT NOT NULL, ts {real} NOT NULL, model TEXT NOT NULL,
    version INTEGER NOT NULL, requests INTEGER NOT NULL, errors INTEGER NOT NULL,
    p50_ms {real}, p95_ms {real}, agreement {real});
CREATE INDEX IF NOT EXISTS model_stats_model_ts ON model_stats (model, ts);
CREATE TABLE IF NOT EXISTS releases (
    model TEXT NOT NULL, version INTEGER NOT NULL, released_at {real} NOT NULL, by TEXT,
    PRIMARY KEY (model, version));
CREATE TABLE IF NOT EXISTS desired (
    device TEXT NOT NULL, model TEXT NOT NULL, version INTEGER NOT NULL,
    seq INTEGER NOT NULL, rollout TEXT, updated_at {real} NOT NULL,
    hold INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (device, model));
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY, model TEXT NOT NULL, state TEXT NOT NULL, created_at {real} NOT NULL,
    updated_at {real} NOT NULL, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at {real} NOT NULL);
CREATE TABLE IF NOT EXISTS audit (
    id {serial}, ts {real} NOT NULL, actor TEXT, action TEXT NOT NULL, rollout TEXT,
    detail TEXT NOT NULL);
"""


@dataclass(frozen=True)
class RegistrySettings:
    max_event_rows: int = 200_000
    max_telemetry_rows: int = 200_000
    prune_every: int = 1000  # inserts between prunes
    busy_timeout_s: float = 5.0


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

    def running(self, model: str) -> int | None:
        """The version of ``model`` the device last said it serves."""
        entry = self.models.get(model) if isinstance(self.models, dict) else None
        if isinstance(entry, dict):
            entry = entry.get("version")
        return entry if isinstance(entry, int) else None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "online": self.online, "last_seen": self.last_seen,
                "profile": self.profile, "agent_version": self.agent_version,
                "arch": self.arch, "group": self.group, "tags": list(self.tags),
                "models": self.models, "desired": self.desired,
                "last_event": self.last_event, "last_event_ts": self.last_event_ts}


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


def _str_or_none(value: Any, limit: int = 1024) -> str | None:
    return None if value is None else str(value)[:limit]


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _num_or_none(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if ok else None


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


def _in(values: Iterable[Any]) -> tuple[str, tuple]:
    values = tuple(values)
    return "(" + ",".join("?" * len(values)) + ")", values


class Registry:
    def __init__(self, target: str | Path, settings: RegistrySettings = RegistrySettings(),
                 clock=time.time) -> None:
        self.target = target
        self.settings = settings
        self._clock = clock
        self._inserts = 0
        self._db = open_backend(target, settings.busy_timeout_s)
        self._db.script(_SCHEMA)
        self._db.script(QUALITY_SCHEMA)
        self._migrate()
        self.quality = QualityStore(self._db)

    def _migrate(self) -> None:
        """Columns added after a registry was first created (same on both backends)."""
        try:
            self._db.execute("SELECT hold FROM desired LIMIT 0")
        except Exception:  # sqlite3 or psycopg error: the column is missing
            self._db.execute("ALTER TABLE desired ADD COLUMN hold INTEGER NOT NULL DEFAULT 0")

    def now(self) -> float:
        """The registry's clock (what its timestamps are in)."""
        return self._clock()

    @property
    def backend(self) -> str:
        return self._db.name

    def close(self) -> None:
        self._db.close()

    def _write(self, sql: str, params: tuple) -> None:
        with self._db.transaction():
            self._db.execute(sql, params)

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        return self._db.execute(sql, params)

    def _touch(self, device: str, now: float) -> None:
        self._db.execute("INSERT INTO devices (id, last_seen) VALUES (?, ?) ON CONFLICT(id) "
                         "DO UPDATE SET last_seen = excluded.last_seen", (device, now))

    # --- what devices report ---------------------------------------------------------------

    def upsert_presence(self, device: str, msg: dict[str, Any]) -> None:
        now = self._clock()
        self._write(
            "INSERT INTO devices (id, online, last_seen, profile, agent_version, arch, models) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
            "online = excluded.online, last_seen = excluded.last_seen, "
            "profile = COALESCE(excluded.profile, devices.profile), "
            "agent_version = COALESCE(excluded.agent_version, devices.agent_version), "
            "arch = COALESCE(excluded.arch, devices.arch), "
            "models = CASE WHEN excluded.models = 'null' THEN devices.models "
            "ELSE excluded.models END",
            (device, int(presence_online(msg)), now, _str_or_none(msg.get("profile")),
             _str_or_none(msg.get("agent_version")), _str_or_none(msg.get("arch"), 64),
             json.dumps(msg.get("models"))))

    def add_event(self, device: str, msg: dict[str, Any]) -> None:
        now = self._clock()
        with self._db.transaction():
            self._touch(device, now)
            self._db.execute(
                "INSERT INTO events (device, ts, event, model, version, reason, detail, raw) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (device, now, _str_or_none(msg.get("event"), 64),
                 _str_or_none(msg.get("model")), _int_or_none(msg.get("version")),
                 _str_or_none(msg.get("reason"), 64), _str_or_none(msg.get("detail")),
                 json.dumps(msg)))
            if msg.get("event") == StatusEvent.SERVING and isinstance(msg.get("model"), str):
                self._note_serving(device, msg)
        self._maybe_prune()

    def _note_serving(self, device: str, msg: dict[str, Any]) -> None:
        """A ``serving`` event updates what the device runs even before its presence."""
        rows = self._db.execute("SELECT models FROM devices WHERE id = ?", (device,))
        models = json.loads(rows[0][0]) if rows else None
        models = models if isinstance(models, dict) else {}
        models[msg["model"]] = {"version": msg.get("version"), "variant": msg.get("variant")}
        self._db.execute("UPDATE devices SET models = ? WHERE id = ?",
                         (json.dumps(models), device))

    def add_telemetry(self, device: str, msg: dict[str, Any]) -> None:
        now = self._clock()
        with self._db.transaction():
            self._touch(device, now)
            self._db.execute("INSERT INTO telemetry (device, ts, raw) VALUES (?, ?, ?)",
                             (device, now, json.dumps(msg)))
            for row in model_stat_rows(msg):
                self._db.execute(
                    "INSERT INTO model_stats (device, ts, model, version, requests, errors, "
                    "p50_ms, p95_ms, agreement) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (device, now, *row))
            self.quality.add(device, now, msg)
        self._maybe_prune()

    def add_release(self, model: str, version: int, released_at: float,
                    by: str | None = None) -> None:
        self._write("INSERT INTO releases (model, version, released_at, by) VALUES "
                    "(?, ?, ?, ?) ON CONFLICT (model, version) DO UPDATE SET "
                    "released_at = excluded.released_at, by = excluded.by",
                    (model, version, released_at, by))

    def _maybe_prune(self) -> None:
        self._inserts += 1
        if self._inserts % self.settings.prune_every:
            return
        for table, keep in (("events", self.settings.max_event_rows),
                            ("telemetry", self.settings.max_telemetry_rows),
                            ("model_stats", self.settings.max_telemetry_rows)):
            self._write(f"DELETE FROM {table} WHERE id <= "
                        f"(SELECT MAX(id) FROM {table}) - ?", (keep,))
        with self._db.transaction():
            self.quality.prune(self.settings.max_telemetry_rows)

    # --- inventory: tags and groups --------------------------------------------------------

    def tag(self, device: str, add: Iterable[str] = (), remove: Iterable[str] = ()) -> None:
        with self._db.transaction():
            self._touch_if_missing(device)
            for t in add:
                self._db.execute("INSERT INTO device_tags (device, tag) VALUES (?, ?) "
                                 "ON CONFLICT (device, tag) DO NOTHING", (device, t))
            for t in remove:
                self._db.execute("DELETE FROM device_tags WHERE device = ? AND tag = ?",
                                 (device, t))

    def set_group(self, device: str, group: str | None) -> None:
        with self._db.transaction():
            self._touch_if_missing(device)
            self._db.execute("UPDATE devices SET grp = ? WHERE id = ?", (group, device))

    def _touch_if_missing(self, device: str) -> None:
        self._db.execute("INSERT INTO devices (id, last_seen) VALUES (?, ?) "
                         "ON CONFLICT (id) DO NOTHING", (device, self._clock()))

    # --- desired state ---------------------------------------------------------------------

    def set_desired(self, device: str, model: str, version: int,
                    rollout: str | None = None,
                    hold: bool = False) -> tuple[DesiredRecord, bool]:
        """Idempotent: asking again for the current desired version (and ``hold``) changes
        nothing (same ``seq``); anything else gets the next fleet-wide ``seq``. ``hold``:
        stage and health-check, do not switch (all-or-none). Returns the record and
        whether it changed."""
        with self._db.transaction():
            rows = self._db.execute("SELECT version, seq, rollout, updated_at, hold FROM "
                                    "desired WHERE device = ? AND model = ?", (device, model))
            if rows and rows[0][0] == version and bool(rows[0][4]) == hold:
                r = rows[0]
                return DesiredRecord(device, model, version, r[1], r[2], r[3], hold), False
            seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM desired")[0][0]
            now = self._clock()
            self._db.execute(
                "INSERT INTO desired (device, model, version, seq, rollout, updated_at, hold) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device, model) DO UPDATE SET "
                "version = excluded.version, seq = excluded.seq, rollout = excluded.rollout, "
                "updated_at = excluded.updated_at, hold = excluded.hold",
                (device, model, version, seq, rollout, now, int(hold)))
            return DesiredRecord(device, model, version, seq, rollout, now, hold), True

    def desired(self, device: str | None = None,
                model: str | None = None) -> list[DesiredRecord]:
        where, params = self._where(("device", device), ("model", model))
        rows = self._query("SELECT device, model, version, seq, rollout, updated_at, hold "
                           f"FROM desired{where} ORDER BY device, model", params)
        return [DesiredRecord(*r[:6], bool(r[6])) for r in rows]

    # --- leases: one rollout runner per registry ------------------------------------------

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take or renew lease ``name`` for ``holder`` until now + ``ttl_s``; True when
        ``holder`` has it. Another holder gets it only once it has expired (one atomic
        upsert, so two processes can never both succeed)."""
        now = self._clock()
        with self._db.transaction():
            self._db.execute(
                "INSERT INTO leases (name, holder, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
                "expires_at = excluded.expires_at WHERE leases.holder = excluded.holder "
                "OR leases.expires_at < ?", (name, holder, now + ttl_s, now))
            rows = self._db.execute("SELECT holder FROM leases WHERE name = ?", (name,))
        return bool(rows) and rows[0][0] == holder

    def release_lease(self, name: str, holder: str) -> None:
        self._write("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))

    def lease(self, name: str) -> tuple[str, float] | None:
        """(holder, expires_at) of lease ``name``, expired or not; None when free."""
        rows = self._query("SELECT holder, expires_at FROM leases WHERE name = ?", (name,))
        return (rows[0][0], rows[0][1]) if rows else None

    @staticmethod
    def _where(*conds: tuple[str, Any]) -> tuple[str, tuple]:
        used = [(col, val) for col, val in conds if val is not None]
        if not used:
            return "", ()
        return " WHERE " + " AND ".join(f"{c} = ?" for c, _ in used), tuple(v for _, v in used)

    # --- rollouts and audit ----------------------------------------------------------------

    def save_rollout(self, rollout_id: str, model: str, state: str,
                     doc: dict[str, Any]) -> None:
        now = self._clock()
        self._write("INSERT INTO rollouts (id, model, state, created_at, updated_at, doc) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                    "state = excluded.state, updated_at = excluded.updated_at, "
                    "doc = excluded.doc", (rollout_id, model, state, now, now,
                                           json.dumps(doc)))

    def rollout(self, rollout_id: str) -> dict[str, Any] | None:
        rows = self._query("SELECT doc FROM rollouts WHERE id = ?", (rollout_id,))
        return json.loads(rows[0][0]) if rows else None

    def rollouts(self, states: Iterable[str] | None = None) -> list[dict[str, Any]]:
        if states is None:
            rows = self._query("SELECT doc FROM rollouts ORDER BY created_at, id")
        else:
            clause, params = _in(states)
            rows = self._query(f"SELECT doc FROM rollouts WHERE state IN {clause} "
                               "ORDER BY created_at, id", params)
        return [json.loads(r[0]) for r in rows]

    def audit(self, actor: str | None, action: str, rollout: str | None = None,
              **detail: Any) -> None:
        self._write("INSERT INTO audit (ts, actor, action, rollout, detail) VALUES "
                    "(?, ?, ?, ?, ?)", (self._clock(), actor, action, rollout,
                                        json.dumps(detail, default=str)))

    def audit_log(self, rollout: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        where, params = self._where(("rollout", rollout))
        rows = self._query(f"SELECT ts, actor, action, rollout, detail FROM audit{where} "
                           f"ORDER BY id DESC LIMIT {int(limit)}", params)
        return [{"ts": r[0], "actor": r[1], "action": r[2], "rollout": r[3],
                 **json.loads(r[4])} for r in reversed(rows)]

    # --- reads -----------------------------------------------------------------------------

    def devices(self, group: str | None = None, tag: str | None = None) -> list[DeviceRecord]:
        where, params = self._where(("d.grp", group))
        if tag is not None:
            where += (" AND " if where else " WHERE ") + \
                "d.id IN (SELECT device FROM device_tags WHERE tag = ?)"
            params += (tag,)
        rows = self._query(
            "SELECT d.id, d.online, d.last_seen, d.profile, d.agent_version, d.models, "
            "e.event, e.ts, d.arch, d.grp FROM devices d LEFT JOIN events e ON e.id = "
            f"(SELECT MAX(id) FROM events WHERE device = d.id){where} ORDER BY d.id", params)
        tags: dict[str, list[str]] = {}
        for dev, t in self._query("SELECT device, tag FROM device_tags ORDER BY tag"):
            tags.setdefault(dev, []).append(t)
        desired: dict[str, dict[str, int]] = {}
        for rec in self.desired():
            desired.setdefault(rec.device, {})[rec.model] = rec.version
        return [DeviceRecord(r[0], bool(r[1]), r[2], r[3], r[4], json.loads(r[5]), r[6], r[7],
                             r[8], r[9], tuple(tags.get(r[0], ())), desired.get(r[0], {}))
                for r in rows]

    def events(self, device: str | None = None, since: float | None = None,
               limit: int = 1000) -> list[EventRecord]:
        where, params = self._where(("device", device))
        if since is not None:
            where += (" AND " if where else " WHERE ") + "ts >= ?"
            params += (since,)
        rows = self._query("SELECT device, ts, event, model, version, reason, detail, raw "
                           f"FROM events{where} ORDER BY id LIMIT {int(limit)}", params)
        return [EventRecord(*r[:7], raw=json.loads(r[7])) for r in rows]

    def install_outcomes(self, model: str, version: int, since: float,
                         events: tuple[StatusEvent, ...] = (StatusEvent.SERVING,
                                                            StatusEvent.FAILED),
                         ) -> dict[str, tuple[str, str | None]]:
        """device -> (last of ``events``, reason) for one model version; all-or-none
        staging asks for ``(HELD, FAILED)``."""
        clause, names = _in(str(e) for e in events)  # plain text for any SQL driver
        rows = self._query("SELECT device, event, reason FROM events WHERE model = ? AND "
                           f"version = ? AND ts >= ? AND event IN {clause} "
                           "ORDER BY id", (model, version, since, *names))
        return {r[0]: (r[1], r[2]) for r in rows}

    def shadow_results(self, model: str, version: int,
                       since: float) -> dict[str, dict[str, Any]]:
        """device -> the ``shadow`` field of its last ``shadow_result`` status event for
        one model version: exactly what the agent's shadow run reported
        (``agent.shadow.ShadowRun.summary``)."""
        rows = self._query("SELECT device, raw FROM events WHERE model = ? AND version = ? "
                           "AND ts >= ? AND event = ? ORDER BY id",
                           (model, version, since, StatusEvent.SHADOW_RESULT.value))
        results = {}
        for device, raw in rows:
            shadow = json.loads(raw).get("shadow")
            if isinstance(shadow, dict):
                results[device] = shadow
        return results

    def version_stats(self, model: str, version: int,
                      since: float) -> dict[str, VersionStats]:
        """device -> its summed serving numbers for ``model`` ``version`` since ``since``."""
        rows = self._query(
            "SELECT device, SUM(requests), SUM(errors), "
            "SUM(p50_ms * requests) / NULLIF(SUM(CASE WHEN p50_ms IS NULL THEN 0 "
            "ELSE requests END), 0), AVG(agreement) FROM model_stats "
            "WHERE model = ? AND version = ? AND ts >= ? GROUP BY device",
            (model, version, since))
        return {r[0]: VersionStats(int(r[1] or 0), int(r[2] or 0), r[3], r[4]) for r in rows}

    def version_series(self, model: str, since: float,
                       bucket_s: float = 10.0) -> list[dict[str, Any]]:
        """Per version and time bucket: requests, errors, mean p50 (for the dashboard)."""
        bucket = f"CAST(ts / {float(bucket_s)!r} AS BIGINT)"  # a number, never user text
        rows = self._query(
            f"SELECT version, {bucket}, SUM(requests), SUM(errors), AVG(p50_ms) "
            "FROM model_stats WHERE model = ? AND ts >= ? GROUP BY 1, 2 ORDER BY 2, 1",
            (model, since))
        return [{"version": r[0], "ts": float(r[1]) * bucket_s, "requests": int(r[2] or 0),
                 "errors": int(r[3] or 0), "p50_ms": r[4]} for r in rows]

    def latest_telemetry(self, device: str) -> dict[str, Any] | None:
        rows = self._query("SELECT raw FROM telemetry WHERE device = ? ORDER BY id DESC "
                           "LIMIT 1", (device,))
        return json.loads(rows[0][0]) if rows else None

    def releases(self, model: str | None = None) -> list[tuple[str, int, float, str | None]]:
        where, params = self._where(("model", model))
        return [tuple(r) for r in self._query(
            f"SELECT model, version, released_at, by FROM releases{where} "
            "ORDER BY model, version", params)]
