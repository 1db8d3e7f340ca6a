"""Predictions awaiting feedback and labelled counts, on disk (SQLite, bounded).

One row per served sample: (model, boot, sample) → request, version, predicted class or
value, time, whether it was labelled. At most ``disk_samples`` rows: past that the oldest
are deleted and the unlabelled ones among them counted (``evicted_disk``). Labelled counts
per (model, version) and the counters live in the same file, and a batch of feedback marks
its rows and adds to the counts in one transaction, so a sample is counted once even across
``kill -9``.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    model TEXT NOT NULL, boot TEXT NOT NULL, sample INTEGER NOT NULL,
    request INTEGER NOT NULL, version INTEGER NOT NULL, predicted REAL, ts REAL NOT NULL,
    labelled INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (model, boot, sample));
CREATE TABLE IF NOT EXISTS versions (
    model TEXT NOT NULL, version INTEGER NOT NULL, task TEXT NOT NULL,
    classes INTEGER NOT NULL, labels TEXT NOT NULL, PRIMARY KEY (model, version));
CREATE TABLE IF NOT EXISTS labelled (
    model TEXT NOT NULL, version INTEGER NOT NULL, doc TEXT NOT NULL,
    PRIMARY KEY (model, version));
CREATE TABLE IF NOT EXISTS counters (
    model TEXT NOT NULL, name TEXT NOT NULL, value INTEGER NOT NULL,
    PRIMARY KEY (model, name));
"""

_IN_CHUNK = 400  # host parameters per IN (...) list


@dataclass(frozen=True)
class Row:
    sample: int
    request: int
    version: int
    predicted: float | None
    labelled: bool


@dataclass(frozen=True)
class VersionMeta:
    task: str
    classes: int
    labels: tuple[str, ...]


class FeedbackStore:
    """Thread-safe: one connection behind a lock."""

    def __init__(self, path: Path, disk_samples: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.disk_samples = disk_samples
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA cache_size=-256")  # KiB: SQLite's default is 2 MiB
        self._db.executescript(_SCHEMA)
        self.rows = int(self._db.execute("SELECT COUNT(*) FROM predictions").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- writes -----------------------------------------------------------------------

    def put_version(self, model: str, version: int, meta: VersionMeta) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO versions VALUES (?,?,?,?,?)",
                             (model, version, meta.task, meta.classes,
                              json.dumps(list(meta.labels))))

    def add(self, chunks: Iterable[tuple[str, str, Any]]) -> None:
        """``chunks``: (model, boot, Folded); one transaction, then eviction."""
        now = time.time()
        chunks = list(chunks)
        count = sum(len(folded.samples) for _, _, folded in chunks)
        if not count:
            return
        rows = ((model, boot, int(s), int(r), folded.version,
                 None if math.isnan(p) else float(p), now)
                for model, boot, folded in chunks
                for s, r, p in zip(folded.samples.tolist(), folded.requests.tolist(),
                                   folded.predicted.tolist()))
        with self._lock, self._txn():
            self._db.executemany("INSERT OR IGNORE INTO predictions (model, boot, sample, "
                                 "request, version, predicted, ts) VALUES (?,?,?,?,?,?,?)",
                                 rows)
            self.rows += count
            self._evict()

    def _evict(self) -> None:
        excess = self.rows - self.disk_samples
        if excess <= 0:
            return
        lost = self._db.execute(
            "SELECT model, COUNT(*) FROM (SELECT model, labelled FROM predictions ORDER BY "
            "rowid LIMIT ?) WHERE labelled = 0 GROUP BY model", (excess,)).fetchall()
        self._db.execute("DELETE FROM predictions WHERE rowid IN (SELECT rowid FROM "
                         "predictions ORDER BY rowid LIMIT ?)", (excess,))
        self.rows -= excess
        for model, count in lost:
            self._bump(model, "evicted_disk", count)

    def label(self, model: str, boot: str, samples: list[int],
              counts: Mapping[int, dict[str, Any]], counters: Mapping[str, int]) -> None:
        """Marks ``samples`` labelled, stores the new cumulative ``counts`` per version and
        adds ``counters``, all in one transaction."""
        with self._lock, self._txn():
            self._db.executemany("UPDATE predictions SET labelled = 1 WHERE model = ? AND "
                                 "boot = ? AND sample = ?",
                                 [(model, boot, s) for s in samples])
            self._db.executemany("INSERT OR REPLACE INTO labelled VALUES (?,?,?)",
                                 [(model, v, json.dumps(doc)) for v, doc in counts.items()])
            for name, value in counters.items():
                self._bump(model, name, value)

    def bump(self, model: str, counters: Mapping[str, int]) -> None:
        with self._lock, self._txn():
            for name, value in counters.items():
                self._bump(model, name, value)

    def _bump(self, model: str, name: str, value: int) -> None:
        if value:
            self._db.execute("INSERT INTO counters VALUES (?,?,?) ON CONFLICT (model, name) "
                             "DO UPDATE SET value = value + excluded.value",
                             (model, name, int(value)))

    def _txn(self) -> "_Txn":
        return _Txn(self._db)

    # --- reads ------------------------------------------------------------------------

    def lookup(self, model: str, boot: str, samples: Iterable[int]) -> dict[int, Row]:
        wanted = sorted(set(samples))
        found: dict[int, Row] = {}
        with self._lock:
            for i in range(0, len(wanted), _IN_CHUNK):
                part = wanted[i:i + _IN_CHUNK]
                marks = ",".join("?" * len(part))
                for s, r, v, p, lab in self._db.execute(
                        "SELECT sample, request, version, predicted, labelled FROM "
                        f"predictions WHERE model = ? AND boot = ? AND sample IN ({marks})",
                        (model, boot, *part)):
                    found[s] = Row(s, r, v, p, bool(lab))
        return found

    def versions(self, model: str) -> dict[int, VersionMeta]:
        with self._lock:
            rows = self._db.execute("SELECT version, task, classes, labels FROM versions "
                                    "WHERE model = ?", (model,)).fetchall()
        return {v: VersionMeta(t, c, tuple(json.loads(lab))) for v, t, c, lab in rows}

    def counts(self, model: str) -> dict[int, dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT version, doc FROM labelled WHERE model = ?",
                                    (model,)).fetchall()
        return {v: json.loads(doc) for v, doc in rows}

    def counters(self, model: str) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT name, value FROM counters WHERE model = ?",
                                    (model,)).fetchall()
            pending = self._db.execute("SELECT COUNT(*) FROM predictions WHERE model = ? "
                                       "AND labelled = 0", (model,)).fetchone()[0]
        return {**dict(rows), "pending_disk": int(pending)}

    def models(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT DISTINCT model FROM versions")]


class _Txn:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")
