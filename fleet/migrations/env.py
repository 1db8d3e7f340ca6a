"""Alembic's entry point: runs the migrations on the connection :func:`upgrade` passes."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run registry migrations through edgeship.fleet.migrations.upgrade")
context.configure(connection=connection,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
