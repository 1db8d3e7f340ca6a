"""The fleet's SQLite registry: devices, their status events, telemetry and releases.

One connection guarded by a lock (SQLite in WAL mode, so ``fleet status`` can read while
the server writes). Messages are stored as received (``raw``) next to the few fields the
fleet queries. Tables that grow with traffic are pruned to ``max_*_rows``.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY, online INTEGER NOT NULL DEFAULT 0, last_seen REAL NOT NULL,
    profile TEXT, agent_version TEXT, models TEXT NOT NULL DEFAULT 'null');
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT NOT NULL, ts REAL NOT NULL,
    event TEXT, model TEXT, version INTEGER, reason TEXT, detail TEXT, raw TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_device_ts ON events (device, ts);
CREATE TABLE IF NOT EXISTS telemetry (
    id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT NOT NULL, ts REAL NOT NULL,
    raw TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS telemetry_device_ts ON telemetry (device, ts);
CREATE TABLE IF NOT EXISTS releases (
    model TEXT NOT NULL, version INTEGER NOT NULL, released_at REAL NOT NULL, by TEXT,
    PRIMARY KEY (model, version));
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


def _str_or_none(value: Any, limit: int = 1024) -> str | None:
    return None if value is None else str(value)[:limit]


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def presence_online(msg: dict[str, Any]) -> bool:
    """Presence says ``"online": bool`` (or ``"state": "online"|"offline"``)."""
    if isinstance(msg.get("online"), bool):
        return msg["online"]
    return msg.get("state") == "online"


class Registry:
    def __init__(self, path: Path, settings: RegistrySettings = RegistrySettings(),
                 clock=time.time) -> None:
        self.path = Path(path)
        self.settings = settings
        self._clock = clock
        self._lock = threading.Lock()
        self._inserts = 0
        self._db = sqlite3.connect(self.path, timeout=settings.busy_timeout_s,
                                   check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, sql: str, params: tuple) -> None:
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.execute(sql, params)

    def _touch(self, device: str, now: float) -> None:
        self._write("INSERT INTO devices (id, last_seen) VALUES (?, ?) ON CONFLICT(id) "
                    "DO UPDATE SET last_seen = excluded.last_seen", (device, now))

    # --- writes ------------------------------------------------------------------------

    def upsert_presence(self, device: str, msg: dict[str, Any]) -> None:
        now = self._clock()
        self._write(
            "INSERT INTO devices (id, online, last_seen, profile, agent_version, models) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
            "online = excluded.online, last_seen = excluded.last_seen, "
            "profile = COALESCE(excluded.profile, devices.profile), "
            "agent_version = COALESCE(excluded.agent_version, devices.agent_version), "
            "models = CASE WHEN excluded.models = 'null' THEN devices.models "
            "ELSE excluded.models END",
            (device, int(presence_online(msg)), now, _str_or_none(msg.get("profile")),
             _str_or_none(msg.get("agent_version")), json.dumps(msg.get("models"))))

    def add_event(self, device: str, msg: dict[str, Any]) -> None:
        now = self._clock()
        self._touch(device, now)
        self._write(
            "INSERT INTO events (device, ts, event, model, version, reason, detail, raw) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (device, now, _str_or_none(msg.get("event"), 64), _str_or_none(msg.get("model")),
             _int_or_none(msg.get("version")), _str_or_none(msg.get("reason"), 64),
             _str_or_none(msg.get("detail")), json.dumps(msg)))
        self._maybe_prune()

    def add_telemetry(self, device: str, msg: dict[str, Any]) -> None:
        now = self._clock()
        self._touch(device, now)
        self._write("INSERT INTO telemetry (device, ts, raw) VALUES (?, ?, ?)",
                    (device, now, json.dumps(msg)))
        self._maybe_prune()

    def add_release(self, model: str, version: int, released_at: float,
                    by: str | None = None) -> None:
        self._write("INSERT OR REPLACE INTO releases (model, version, released_at, by) "
                    "VALUES (?, ?, ?, ?)", (model, version, released_at, by))

    def _maybe_prune(self) -> None:
        self._inserts += 1
        if self._inserts % self.settings.prune_every:
            return
        for table, keep in (("events", self.settings.max_event_rows),
                            ("telemetry", self.settings.max_telemetry_rows)):
            self._write(f"DELETE FROM {table} WHERE id <= "
                        f"(SELECT MAX(id) FROM {table}) - ?", (keep,))

    # --- reads -------------------------------------------------------------------------

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def devices(self) -> list[DeviceRecord]:
        rows = self._query(
            "SELECT d.id, d.online, d.last_seen, d.profile, d.agent_version, d.models, "
            "e.event, e.ts FROM devices d LEFT JOIN events e ON e.id = "
            "(SELECT MAX(id) FROM events WHERE device = d.id) ORDER BY d.id")
        return [DeviceRecord(r[0], bool(r[1]), r[2], r[3], r[4], json.loads(r[5]), r[6], r[7])
                for r in rows]

    def events(self, device: str | None = None, since: float | None = None,
               limit: int = 1000) -> list[EventRecord]:
        sql = ("SELECT device, ts, event, model, version, reason, detail, raw FROM events "
               "WHERE (? IS NULL OR device = ?) AND (? IS NULL OR ts >= ?) "
               "ORDER BY id LIMIT ?")
        rows = self._query(sql, (device, device, since, since, limit))
        return [EventRecord(*r[:7], raw=json.loads(r[7])) for r in rows]

    def latest_telemetry(self, device: str) -> dict[str, Any] | None:
        rows = self._query("SELECT raw FROM telemetry WHERE device = ? ORDER BY id DESC "
                           "LIMIT 1", (device,))
        return json.loads(rows[0][0]) if rows else None

    def releases(self, model: str | None = None) -> list[tuple[str, int, float, str | None]]:
        return self._query("SELECT model, version, released_at, by FROM releases "
                           "WHERE (? IS NULL OR model = ?) ORDER BY model, version",
                           (model, model))
