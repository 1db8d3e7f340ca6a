"""The ``meta`` table: registry-wide facts. Its ``epoch`` row (the registry's creation time
in milliseconds, written when the registry is first opened by a fleet server) orders the
desired states this registry publishes, so a recreated registry outranks the old one.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("meta", sa.Column("key", sa.Text, primary_key=True),
                    sa.Column("value", sa.Text, nullable=False))
