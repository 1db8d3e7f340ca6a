"""The registry's database: SQLAlchemy Core on SQLite (the embedded default) or PostgreSQL
(a ``postgresql://`` URL, through psycopg 3 and a connection pool). Every query binds its
parameters; the schema is :mod:`fleet.schema`, brought up to date by Alembic migrations
(:mod:`fleet.migrations`) when a registry is opened.

SQLite: WAL mode, so readers (the dashboard, ``fleet status``) never wait for the writer;
writes in this process take one lock and ``BEGIN IMMEDIATE`` (other processes wait up to
``busy_timeout_s``), so two writer threads never fail on "database is locked".
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from sqlalchemy import Table, create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from edgeship.agent.errors import ConfigError, EdgeshipError

logger = logging.getLogger(__name__)


def is_url(target: str | Path) -> bool:
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://",
                                                          "postgresql+psycopg://"))


def engine_url(target: str | Path) -> str:
    """The SQLAlchemy URL of a registry target (a path or a ``postgresql://`` URL)."""
    if is_url(target):
        rest = str(target).split("://", 1)[1]
        return f"postgresql+psycopg://{rest}"
    if isinstance(target, str) and "://" in target:
        raise ConfigError(f"registry {target!r}: use a file path or a postgresql:// URL",
                          key="db")
    return f"sqlite:///{Path(target)}"


class Database:
    """One engine (and pool) per registry; ``read()`` and ``write()`` hand out a
    connection inside one transaction."""

    def __init__(self, target: str | Path, *, busy_timeout_s: float = 5.0,
                 pool_size: int = 8) -> None:
        url = engine_url(target)
        self.dialect = "postgresql" if url.startswith("postgresql") else "sqlite"
        self._write_lock = threading.RLock() if self.dialect == "sqlite" else None
        try:
            self.engine = self._engine(url, busy_timeout_s, pool_size)
        except ImportError as e:  # the fleet extra brings psycopg
            raise EdgeshipError("a postgresql:// registry needs psycopg "
                                "(pip install 'edgeship[fleet]')") from e
        try:
            from edgeship.fleet.migrations import upgrade
            upgrade(self.engine)
        except SQLAlchemyError as e:
            self.engine.dispose()
            raise EdgeshipError(f"cannot open the registry {target}: "
                                f"{str(e).splitlines()[0]}") from e

    def _engine(self, url: str, busy_timeout_s: float, pool_size: int) -> Engine:
        if self.dialect == "postgresql":
            return create_engine(url, pool_size=pool_size, max_overflow=pool_size,
                                 pool_pre_ping=True, pool_recycle=1800,
                                 connect_args={"connect_timeout": 10})
        engine = create_engine(url, pool_size=pool_size, max_overflow=2 * pool_size,
                               connect_args={"timeout": busy_timeout_s,
                                             "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (below)
            dbapi_conn.execute("PRAGMA journal_mode=WAL")
            dbapi_conn.execute("PRAGMA synchronous=NORMAL")

        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            immediate = conn.get_execution_options().get("edgeship_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
        return engine

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            with conn.begin():
                yield conn

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One write transaction (committed on success, rolled back on any error)."""
        if self._write_lock is None:
            with self.engine.begin() as conn:
                yield conn
            return
        with self._write_lock, self.engine.connect() as conn:
            conn = conn.execution_options(edgeship_write=True)
            with conn.begin():
                yield conn

    def upsert(self, table: Table, values: dict[str, Any] | None, keys: Sequence[str],
               update: Sequence[str] | dict[str, Any] = (), where: Any = None) -> Any:
        """``INSERT … ON CONFLICT (keys) DO UPDATE`` (or ``DO NOTHING`` without ``update``)
        in this backend's dialect. ``update``: column names to take from the new row, or
        a mapping of column → expression (``stmt.excluded`` is passed to callables).
        ``values`` None: no values in the statement (execute it with a list of rows)."""
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        stmt = insert(table) if values is None else insert(table).values(**values)
        if not update:
            return stmt.on_conflict_do_nothing(index_elements=list(keys))
        if isinstance(update, dict):
            sets = {k: (v(stmt.excluded) if callable(v) else v) for k, v in update.items()}
        else:
            sets = {k: stmt.excluded[k] for k in update}
        if callable(where):
            where = where(stmt.excluded)
        return stmt.on_conflict_do_update(index_elements=list(keys), set_=sets, where=where)

    def close(self) -> None:
        self.engine.dispose()


def single_use(target: str | Path) -> Engine:
    """An engine without a pool, for one-off tools and tests (no migrations run)."""
    return create_engine(engine_url(target), poolclass=NullPool)
