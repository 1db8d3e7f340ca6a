"""The registry's tables as SQLAlchemy Core metadata: the current (head) schema. Both
backends run it; :mod:`fleet.migrations` takes older registries there. A change here needs
a new migration in ``fleet/migrations/versions/`` (a test compares the two)."""

from __future__ import annotations

from sqlalchemy import (BigInteger, Column, Float, Index, Integer, MetaData, Table, Text)

metadata = MetaData()


def _id() -> Column:
    # INTEGER on SQLite (its rowid alias, AUTOINCREMENT-free), BIGSERIAL on PostgreSQL
    return Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                  autoincrement=True)


devices = Table(
    "devices", metadata,
    Column("id", Text, primary_key=True),
    Column("online", Integer, nullable=False, server_default="0"),
    Column("last_seen", Float, nullable=False),
    Column("profile", Text), Column("agent_version", Text), Column("arch", Text),
    Column("grp", Text),
    Column("models", Text, nullable=False, server_default="null"),
    # denormalised from reports so one indexed read serves a page of 10,000 devices
    Column("last_event", Text), Column("last_event_ts", Float),
    Column("last_failure", Text), Column("last_failure_ts", Float),
    Column("cpu_percent", Float), Column("memory_percent", Float),
    Column("temperature_c", Float), Column("vitals_ts", Float),
    Column("last_failure_detail", Text),
    Index("devices_profile", "profile"), Index("devices_online", "online"),
)

device_tags = Table(
    "device_tags", metadata,
    Column("device", Text, primary_key=True), Column("tag", Text, primary_key=True),
)

events = Table(
    "events", metadata, _id(),
    Column("device", Text, nullable=False), Column("ts", Float, nullable=False),
    Column("event", Text), Column("model", Text), Column("version", Integer),
    Column("reason", Text), Column("detail", Text), Column("raw", Text, nullable=False),
    Index("events_device_ts", "device", "ts"),
    Index("events_model_version", "model", "version", "event"), sqlite_autoincrement=True,
)

telemetry = Table(
    "telemetry", metadata, _id(),
    Column("device", Text, nullable=False), Column("ts", Float, nullable=False),
    Column("raw", Text, nullable=False),
    Index("telemetry_device_ts", "device", "ts"), sqlite_autoincrement=True,
)

model_stats = Table(
    "model_stats", metadata, _id(),
    Column("device", Text, nullable=False), Column("ts", Float, nullable=False),
    Column("model", Text, nullable=False), Column("version", Integer, nullable=False),
    Column("requests", Integer, nullable=False), Column("errors", Integer, nullable=False),
    Column("p50_ms", Float), Column("p95_ms", Float), Column("agreement", Float),
    Index("model_stats_model_ts", "model", "ts"), sqlite_autoincrement=True,
)

releases = Table(
    "releases", metadata,
    Column("model", Text, primary_key=True), Column("version", Integer, primary_key=True),
    Column("released_at", Float, nullable=False), Column("by", Text),
)

desired = Table(
    "desired", metadata,
    Column("device", Text, primary_key=True), Column("model", Text, primary_key=True),
    Column("version", Integer, nullable=False), Column("seq", Integer, nullable=False),
    Column("rollout", Text), Column("updated_at", Float, nullable=False),
    Column("hold", Integer, nullable=False, server_default="0"),
)

rollouts = Table(
    "rollouts", metadata,
    Column("id", Text, primary_key=True), Column("model", Text, nullable=False),
    Column("state", Text, nullable=False), Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False), Column("doc", Text, nullable=False),
)

leases = Table(
    "leases", metadata,
    Column("name", Text, primary_key=True), Column("holder", Text, nullable=False),
    Column("expires_at", Float, nullable=False),
)

audit = Table(
    "audit", metadata, _id(),
    Column("ts", Float, nullable=False), Column("actor", Text),
    Column("action", Text, nullable=False), Column("rollout", Text),
    Column("detail", Text, nullable=False),
    Column("token", Text),  # id of the API token that did it (None: CLI or the fleet)
    sqlite_autoincrement=True,
)

api_tokens = Table(
    "api_tokens", metadata,
    Column("id", Text, primary_key=True), Column("name", Text, nullable=False),
    Column("role", Text, nullable=False),
    Column("secret_sha256", Text, nullable=False),  # never the secret itself
    Column("created_at", Float, nullable=False), Column("created_by", Text),
    Column("expires_at", Float), Column("revoked_at", Float), Column("last_used_at", Float),
)

fleet_members = Table(  # fleet servers sharing this registry (fleet.membership)
    "fleet_members", metadata,
    Column("id", Text, primary_key=True), Column("since", Float, nullable=False),
    Column("leaves_at", Float),  # announced leave; None while it stays
    Column("expires_at", Float, nullable=False),
)

announcements = Table(  # the newest announcement per model (re-sent to returning devices)
    "announcements", metadata,
    Column("model", Text, primary_key=True), Column("version", Integer, nullable=False),
    Column("released_at", Float, nullable=False),
    Column("spread_s", Float, nullable=False, server_default="0"),
)

meta = Table(  # registry-wide facts: "epoch" (creation time in ms, orders desired states)
    "meta", metadata,
    Column("key", Text, primary_key=True), Column("value", Text, nullable=False),
)

quality_reports = Table(
    "quality_reports", metadata, _id(),
    Column("device", Text, nullable=False), Column("ts", Float, nullable=False),
    Column("model", Text, nullable=False), Column("version", Integer, nullable=False),
    Column("samples", Integer, nullable=False),      # in the device's drift window
    Column("drift_js", Float), Column("drift_signal", Text),  # its most drifted signal
    Column("est_n", Integer, nullable=False), Column("est_above", Integer, nullable=False),
    Column("doc", Text, nullable=False),  # the device's quality section for the model
    Index("quality_model_version_ts", "model", "version", "ts"),
    Index("quality_model_device", "model", "device", "id"), sqlite_autoincrement=True,
)
