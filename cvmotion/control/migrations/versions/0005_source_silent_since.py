"""control layer: operations.source_silent_since — since when a started migration's source has not answered.

A live migration counts against the fleet's limit of migrations in flight from the moment it is started
until it settles.  One whose source has stopped answering moves no data anyone can see; past a grace it
gives its slot back (``worker.SILENT_SOURCE_GRACE_S``) so a failed host does not hold the whole fleet's
maintenance back, and takes one again when its source answers.

Revision ID: 0005_source_silent_since
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_source_silent_since"
down_revision = "0004_reported_since"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("operations") as batch:
        batch.add_column(sa.Column("source_silent_since", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("operations") as batch:
        batch.drop_column("source_silent_since")
