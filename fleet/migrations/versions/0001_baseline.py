"""The registry as it was before migrations: create what is missing.

Runs over an empty database and over a registry made by an older release (no
``alembic_version``; possibly without ``desired.hold``). The tables are frozen here: this
revision never changes; later ones build on it.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _id() -> sa.Column:
    return sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"),
                     primary_key=True, autoincrement=True)


def _tables() -> sa.MetaData:
    m = sa.MetaData()
    real, text, integer = sa.Float, sa.Text, sa.Integer
    sa.Table("devices", m, sa.Column("id", text, primary_key=True),
             sa.Column("online", integer, nullable=False, server_default="0"),
             sa.Column("last_seen", real, nullable=False), sa.Column("profile", text),
             sa.Column("agent_version", text), sa.Column("arch", text), sa.Column("grp", text),
             sa.Column("models", text, nullable=False, server_default="null"))
    sa.Table("device_tags", m, sa.Column("device", text, primary_key=True),
             sa.Column("tag", text, primary_key=True))
    sa.Table("events", m, _id(), sa.Column("device", text, nullable=False),
             sa.Column("ts", real, nullable=False), sa.Column("event", text),
             sa.Column("model", text), sa.Column("version", integer),
             sa.Column("reason", text), sa.Column("detail", text),
             sa.Column("raw", text, nullable=False),
             sa.Index("events_device_ts", "device", "ts"),
             sa.Index("events_model_version", "model", "version", "event"),
             sqlite_autoincrement=True)
    sa.Table("telemetry", m, _id(), sa.Column("device", text, nullable=False),
             sa.Column("ts", real, nullable=False), sa.Column("raw", text, nullable=False),
             sa.Index("telemetry_device_ts", "device", "ts"), sqlite_autoincrement=True)
    sa.Table("model_stats", m, _id(), sa.Column("device", text, nullable=False),
             sa.Column("ts", real, nullable=False), sa.Column("model", text, nullable=False),
             sa.Column("version", integer, nullable=False),
             sa.Column("requests", integer, nullable=False),
             sa.Column("errors", integer, nullable=False), sa.Column("p50_ms", real),
             sa.Column("p95_ms", real), sa.Column("agreement", real),
             sa.Index("model_stats_model_ts", "model", "ts"), sqlite_autoincrement=True)
    sa.Table("releases", m, sa.Column("model", text, primary_key=True),
             sa.Column("version", integer, primary_key=True),
             sa.Column("released_at", real, nullable=False), sa.Column("by", text))
    sa.Table("desired", m, sa.Column("device", text, primary_key=True),
             sa.Column("model", text, primary_key=True),
             sa.Column("version", integer, nullable=False),
             sa.Column("seq", integer, nullable=False), sa.Column("rollout", text),
             sa.Column("updated_at", real, nullable=False),
             sa.Column("hold", integer, nullable=False, server_default="0"))
    sa.Table("rollouts", m, sa.Column("id", text, primary_key=True),
             sa.Column("model", text, nullable=False), sa.Column("state", text, nullable=False),
             sa.Column("created_at", real, nullable=False),
             sa.Column("updated_at", real, nullable=False),
             sa.Column("doc", text, nullable=False))
    sa.Table("leases", m, sa.Column("name", text, primary_key=True),
             sa.Column("holder", text, nullable=False),
             sa.Column("expires_at", real, nullable=False))
    sa.Table("audit", m, _id(), sa.Column("ts", real, nullable=False),
             sa.Column("actor", text), sa.Column("action", text, nullable=False),
             sa.Column("rollout", text), sa.Column("detail", text, nullable=False),
             sqlite_autoincrement=True)
    return m


def upgrade() -> None:
    bind = op.get_bind()
    _tables().create_all(bind, checkfirst=True)
    columns = {c["name"] for c in sa.inspect(bind).get_columns("desired")}
    if "hold" not in columns:  # registries made before all-or-none rollouts
        op.add_column("desired", sa.Column("hold", sa.Integer, nullable=False,
                                           server_default="0"))
