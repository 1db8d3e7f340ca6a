"""Store-and-forward for telemetry: a bounded on-disk queue in SQLite.

Every record is written here first (committed, WAL, ``synchronous=FULL``) and removed only
after the broker acknowledged it with a success reason code. A refused publish (PUBACK
reason >= 0x80) moves the record to a bounded dead-letter table. When the queue is full the
oldest records are evicted and counted; the counters live in the same database, so they
survive restarts and ``kill -9``.

Each record gets a sequence number (``seq``) that never repeats for one spool file; a
consumer deduplicates on (device, seq). A record acknowledged by the broker but not yet
deleted when the process dies is sent again: at-least-once, duplicates are the consumer's
to count.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgeship.agent.errors import EdgeshipError, Reason

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    created_s REAL NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letter (
    seq INTEGER PRIMARY KEY,
    created_s REAL NOT NULL,
    failed_s REAL NOT NULL,
    reason_code INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""

COUNTERS = ("evicted", "acked", "dead_lettered", "pushed")


class SpoolError(EdgeshipError):
    reason_code = Reason.INTERNAL


@dataclass(frozen=True)
class SpoolSettings:
    path: Path
    max_records: int = 10_000
    max_dead_letters: int = 1_000
    max_record_bytes: int = 256 * 1024


@dataclass(frozen=True)
class SpoolStats:
    queued: int
    dead_letters: int
    evicted: int
    acked: int
    dead_lettered: int
    pushed: int
    last_seq: int

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class TelemetrySpool:
    """Thread-safe; one connection guarded by a lock (writes are small and rare)."""

    def __init__(self, settings: SpoolSettings) -> None:
        if settings.max_records < 1 or settings.max_dead_letters < 1:
            raise SpoolError("spool bounds must be >= 1")
        self.settings = settings
        settings.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._claimed: set[int] = set()  # being published: never evicted under the sender
        try:
            self._db = sqlite3.connect(str(settings.path), check_same_thread=False,
                                       isolation_level=None, timeout=10)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            for name in COUNTERS:
                self._db.execute("INSERT OR IGNORE INTO counters VALUES (?, 0)", (name,))
        except sqlite3.Error as e:
            raise SpoolError(f"cannot open telemetry spool {settings.path}: {e}") from e

    # --- writing ----------------------------------------------------------------------

    def push(self, make_payload: Callable[[int], bytes]) -> int:
        """Append a record built by ``make_payload(seq)``; evict the oldest when full.
        Returns the record's sequence number."""
        with self._lock, self._tx() as db:
            cur = db.execute("INSERT INTO queue (created_s, payload) VALUES (?, x'')",
                             (time.time(),))
            assert cur.lastrowid is not None  # an INSERT always sets it
            seq = cur.lastrowid
            payload = make_payload(seq)
            if len(payload) > self.settings.max_record_bytes:
                raise SpoolError(f"telemetry record of {len(payload)} bytes exceeds "
                                 f"{self.settings.max_record_bytes}")
            db.execute("UPDATE queue SET payload = ? WHERE seq = ?", (payload, seq))
            self._bump(db, "pushed", 1)
            self._evict_over(db)
            return seq

    def _evict_over(self, db: sqlite3.Connection) -> None:
        (count,) = db.execute("SELECT COUNT(*) FROM queue").fetchone()
        over = count - self.settings.max_records
        if over > 0:
            claimed = ",".join(str(int(s)) for s in self._claimed)
            cur = db.execute(f"DELETE FROM queue WHERE seq IN (SELECT seq FROM queue WHERE "
                             f"seq NOT IN ({claimed}) ORDER BY seq LIMIT ?)", (over,))
            self._bump(db, "evicted", cur.rowcount)
            logger.warning("telemetry spool full: evicted %d oldest record(s)", cur.rowcount)

    def ack(self, seq: int) -> None:
        """The broker accepted ``seq``: forget it."""
        with self._lock, self._tx() as db:
            self._claimed.discard(seq)
            if db.execute("DELETE FROM queue WHERE seq = ?", (seq,)).rowcount:
                self._bump(db, "acked", 1)

    def dead_letter(self, seq: int, reason_code: int) -> None:
        """The broker refused ``seq``: keep it aside (bounded), never retry it."""
        with self._lock, self._tx() as db:
            self._claimed.discard(seq)
            row = db.execute("SELECT created_s, payload FROM queue WHERE seq = ?",
                             (seq,)).fetchone()
            if row is None:
                return
            db.execute("DELETE FROM queue WHERE seq = ?", (seq,))
            db.execute("INSERT OR REPLACE INTO dead_letter VALUES (?, ?, ?, ?, ?)",
                       (seq, row[0], time.time(), reason_code, row[1]))
            self._bump(db, "dead_lettered", 1)
            db.execute("DELETE FROM dead_letter WHERE seq NOT IN (SELECT seq FROM "
                       "dead_letter ORDER BY seq DESC LIMIT ?)",
                       (self.settings.max_dead_letters,))

    # --- reading ----------------------------------------------------------------------

    def peek(self, limit: int = 1) -> list[tuple[int, bytes]]:
        """The oldest ``limit`` records, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT seq, payload FROM queue ORDER BY seq LIMIT ?",
                                    (limit,)).fetchall()
        return [(int(s), bytes(p)) for s, p in rows]

    def claim(self, limit: int = 16) -> list[tuple[int, bytes]]:
        """Like ``peek``, and the records stay out of eviction until ``ack``,
        ``dead_letter`` or ``release``: a record is either evicted or sent, never both.
        (The queue may exceed ``max_records`` by the claimed few meanwhile.)"""
        with self._lock:
            rows = self._db.execute("SELECT seq, payload FROM queue ORDER BY seq LIMIT ?",
                                    (limit,)).fetchall()
            self._claimed = {int(s) for s, _ in rows}
        return [(int(s), bytes(p)) for s, p in rows]

    def release(self) -> None:
        """Sending stopped (offline, no PUBACK): claimed records may be evicted again."""
        with self._lock:
            self._claimed.clear()

    def dead_letters(self) -> list[tuple[int, int, bytes]]:
        with self._lock:
            rows = self._db.execute("SELECT seq, reason_code, payload FROM dead_letter "
                                    "ORDER BY seq").fetchall()
        return [(int(s), int(rc), bytes(p)) for s, rc, p in rows]

    def stats(self) -> SpoolStats:
        with self._lock:
            counters = dict(self._db.execute("SELECT name, value FROM counters").fetchall())
            (queued,) = self._db.execute("SELECT COUNT(*) FROM queue").fetchone()
            (dead,) = self._db.execute("SELECT COUNT(*) FROM dead_letter").fetchone()
            row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'queue'"
                                   ).fetchone()
        return SpoolStats(queued=queued, dead_letters=dead, last_seq=int(row[0]) if row else 0,
                          **{k: int(counters.get(k, 0)) for k in COUNTERS})

    def __len__(self) -> int:
        return self.stats().queued

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- helpers ----------------------------------------------------------------------

    def _tx(self) -> "_Transaction":
        return _Transaction(self._db)

    @staticmethod
    def _bump(db: sqlite3.Connection, name: str, by: int) -> None:
        db.execute("UPDATE counters SET value = value + ? WHERE name = ?", (by, name))


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
