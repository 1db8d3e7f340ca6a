"""Two SQL backends behind one tiny interface: SQLite (the embedded default) and PostgreSQL
(through a ``postgresql://`` URL, for scale). Queries are written once with ``?``
placeholders and portable SQL (``ON CONFLICT … DO UPDATE``, ``excluded.``); the PostgreSQL
backend rewrites the placeholders. The schema differs only in the auto-increment key.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Protocol

from edgeship.agent.errors import ConfigError, EdgeshipError

logger = logging.getLogger(__name__)

#: ``{serial}`` and ``{real}`` are filled in per backend.
AUTO_ID = "{serial}"


class Backend(Protocol):
    name: str

    def execute(self, sql: str, params: tuple = ()) -> list[tuple]: ...

    def transaction(self) -> Any: ...

    def close(self) -> None: ...


def is_url(target: str | Path) -> bool:
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def open_backend(target: str | Path, busy_timeout_s: float = 5.0) -> "Backend":
    if is_url(target):
        return PostgresBackend(str(target))
    if isinstance(target, str) and "://" in target:
        raise ConfigError(f"registry {target!r}: use a file path or a postgresql:// URL",
                          key="db")
    return SqliteBackend(Path(target), busy_timeout_s)


class SqliteBackend:
    name = "sqlite"
    types = {"serial": "INTEGER PRIMARY KEY AUTOINCREMENT", "real": "REAL"}

    def __init__(self, path: Path, busy_timeout_s: float) -> None:
        self._lock = threading.RLock()
        self._depth = 0
        self._db = sqlite3.connect(path, timeout=busy_timeout_s, check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")

    def script(self, sql: str) -> None:
        with self._lock:
            self._db.executescript(sql.format(**self.types))

    def execute(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            self._depth += 1
            if self._depth == 1:
                self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                if self._depth == 1:
                    self._db.execute("ROLLBACK")
                raise
            else:
                if self._depth == 1:
                    self._db.execute("COMMIT")
            finally:
                self._depth -= 1

    def close(self) -> None:
        with self._lock:
            self._db.close()


class PostgresBackend:
    name = "postgresql"
    types = {"serial": "BIGSERIAL PRIMARY KEY", "real": "DOUBLE PRECISION"}

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError as e:  # the fleet extra brings it
            raise EdgeshipError("a postgresql:// registry needs psycopg "
                                "(pip install 'edgeship[fleet]')") from e
        self._lock = threading.RLock()
        try:
            self._db = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as e:
            raise EdgeshipError(f"cannot connect to the registry database: {e}") from e

    def script(self, sql: str) -> None:
        with self._lock, self._db.transaction():
            for stmt in sql.format(**self.types).split(";"):
                if stmt.strip():
                    self._db.execute(stmt)

    def execute(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            cur = self._db.execute(sql.replace("?", "%s"), params)
            return cur.fetchall() if cur.description else []

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock, self._db.transaction():
            yield

    def close(self) -> None:
        with self._lock:
            self._db.close()
