"""Fleet servers sharing a registry (``fleet_members``: who splits the devices when the
broker has no shared subscriptions) and the newest announcement per model
(``announcements``: re-sent to a device that comes back online).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fleet_members", sa.Column("id", sa.Text, primary_key=True),
        sa.Column("since", sa.Float, nullable=False), sa.Column("leaves_at", sa.Float),
        sa.Column("expires_at", sa.Float, nullable=False))
    op.create_table(
        "announcements", sa.Column("model", sa.Text, primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("released_at", sa.Float, nullable=False),
        sa.Column("spread_s", sa.Float, nullable=False, server_default="0"))
