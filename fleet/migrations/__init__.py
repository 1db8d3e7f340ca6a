"""Schema migrations of the registry (Alembic). :func:`upgrade` brings any registry to the
head revision in place, keeping its data; it runs whenever a registry is opened and does
nothing when the registry is current. ``alembic_version`` holds the revision.

A registry made before migrations existed has no ``alembic_version``: revision 0001 is
that schema, written so it can run over such a registry (it creates only what is missing,
including the ``hold`` column older registries lack), and every later revision runs on
top of it.

New revision: add ``versions/NNNN_what.py`` with ``down_revision`` set to the current head
and change :mod:`fleet.schema` to match (``tests/fleet_control/test_migrations.py`` checks
that a migrated registry and the schema agree).
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy.engine import Engine

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent


def _config(connection=None):
    from alembic.config import Config
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    from alembic.script import ScriptDirectory
    return ScriptDirectory.from_config(_config()).get_current_head()


def current(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate to ``revision`` (default: the newest) in one transaction per revision."""
    if revision == "head" and current(engine) == head():
        return
    from alembic import command
    with engine.connect() as conn:
        conn = conn.execution_options(edgeship_write=True)  # SQLite: BEGIN IMMEDIATE
        with conn.begin():
            if conn.dialect.name == "postgresql":  # two processes opening a new registry
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7461001)")
            command.upgrade(_config(conn), revision)
    logger.info("registry schema at revision %s", current(engine))
