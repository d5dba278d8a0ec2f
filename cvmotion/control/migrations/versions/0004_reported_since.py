"""control layer: hosts.reported_since — when the report before the latest one arrived.

A host's daemon heartbeats one report at a time, so its latest report was put together after the previous
one was answered: that time is the earliest the latest report can describe.  The sweep compares a VM with
its host's report only when the VM settled there before it (a report assembled before a VM arrived must
not make the VM look missing).

Revision ID: 0004_reported_since
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_reported_since"
down_revision = "0003_webhooks"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("hosts") as batch:
        batch.add_column(sa.Column("reported_since", sa.Float, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("hosts") as batch:
        batch.drop_column("reported_since")
