"""Model quality: one row per device, model and telemetry record with the device's quality
section (drift window counts, label-free estimate counts, cumulative labelled counts) and
the few numbers the dashboard's series and the rollout gates query.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "quality_reports",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("device", sa.Text, nullable=False), sa.Column("ts", sa.Float, nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("samples", sa.Integer, nullable=False), sa.Column("drift_js", sa.Float),
        sa.Column("drift_signal", sa.Text), sa.Column("est_n", sa.Integer, nullable=False),
        sa.Column("est_above", sa.Integer, nullable=False),
        sa.Column("doc", sa.Text, nullable=False), sqlite_autoincrement=True)
    op.create_index("quality_model_version_ts", "quality_reports", ["model", "version", "ts"])
    op.create_index("quality_model_device", "quality_reports", ["model", "device", "id"])


def downgrade() -> None:
    op.drop_table("quality_reports")
