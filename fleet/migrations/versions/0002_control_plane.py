"""API tokens, the token behind each audit row, and per-device columns the dashboard pages
on (last event, last failure, CPU/memory/temperature), filled in from the reports already
stored.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_DEVICE_COLUMNS = [("last_event", sa.Text), ("last_event_ts", sa.Float),
                   ("last_failure", sa.Text), ("last_failure_ts", sa.Float),
                   ("cpu_percent", sa.Float), ("memory_percent", sa.Float),
                   ("temperature_c", sa.Float), ("vitals_ts", sa.Float)]


def upgrade() -> None:
    for name, typ in _DEVICE_COLUMNS:
        op.add_column("devices", sa.Column(name, typ))
    op.create_index("devices_profile", "devices", ["profile"])
    op.create_index("devices_online", "devices", ["online"])
    op.add_column("audit", sa.Column("token", sa.Text))
    op.create_table(
        "api_tokens", sa.Column("id", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, nullable=False), sa.Column("role", sa.Text, nullable=False),
        sa.Column("secret_sha256", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False), sa.Column("created_by", sa.Text),
        sa.Column("expires_at", sa.Float), sa.Column("revoked_at", sa.Float),
        sa.Column("last_used_at", sa.Float))
    _backfill(op.get_bind())


def _backfill(bind: sa.engine.Connection) -> None:
    last = ("SELECT e.device, e.event, e.ts, e.reason FROM events e WHERE e.id IN "
            "(SELECT MAX(id) FROM events {where} GROUP BY device)")
    for device, event, ts, _ in bind.execute(sa.text(last.format(where=""))):
        bind.execute(sa.text("UPDATE devices SET last_event = :e, last_event_ts = :ts "
                             "WHERE id = :d"), {"e": event, "ts": ts, "d": device})
    failures = last.format(where="WHERE event IN ('failed', 'rejected')")
    for device, event, ts, reason in bind.execute(sa.text(failures)):
        bind.execute(sa.text("UPDATE devices SET last_failure = :r, last_failure_ts = :ts "
                             "WHERE id = :d"), {"r": reason or event, "ts": ts, "d": device})
    latest = sa.text("SELECT device, ts, raw FROM telemetry WHERE id IN "
                     "(SELECT MAX(id) FROM telemetry GROUP BY device)")
    from edgeship.fleet.registry import vitals  # the same parser as new reports use
    for device, ts, raw in bind.execute(latest):
        try:
            cpu, mem, temp = vitals(json.loads(raw))
        except ValueError:
            continue
        bind.execute(sa.text("UPDATE devices SET cpu_percent = :c, memory_percent = :m, "
                             "temperature_c = :t, vitals_ts = :ts WHERE id = :d"),
                     {"c": cpu, "m": mem, "t": temp, "ts": ts, "d": device})
