"""The detail of each device's last failure (e.g. "47.0 ms > 20.0 ms (the release's
budget)" beside latency_budget_exceeded), filled in from the events already stored.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("devices", sa.Column("last_failure_detail", sa.Text))
    bind = op.get_bind()
    last = sa.text("SELECT device, detail FROM events WHERE id IN (SELECT MAX(id) FROM "
                   "events WHERE event IN ('failed', 'rejected') GROUP BY device)")
    for device, detail in bind.execute(last):
        if detail:
            bind.execute(sa.text("UPDATE devices SET last_failure_detail = :x WHERE id = :d"),
                         {"x": detail, "d": device})
