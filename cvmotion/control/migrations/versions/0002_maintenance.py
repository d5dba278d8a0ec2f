"""control layer: host maintenance — cordons, drains and each VM's ladder, windows, Scheduled Events.

Revision ID: 0002_maintenance
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_maintenance"
down_revision = "0001"
branch_labels = None
depends_on = None


def _enum(name: str, *values: str) -> sa.Enum:
    # As db._enum: the member's value in a VARCHAR(32), no native type, no CHECK constraint.
    return sa.Enum(*values, name=name, native_enum=False, length=32, create_constraint=False)


_REASON = ("SecurityUpdate", "HardwareRefresh")


def upgrade() -> None:
    with op.batch_alter_table("hosts") as batch:
        batch.add_column(sa.Column("cordoned", sa.Boolean, nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("cordon_reason", sa.String(256), nullable=False, server_default=""))
    op.create_table(
        "drains",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("host", sa.String(63), nullable=False, index=True),
        sa.Column("active_host", sa.String(63), nullable=True, unique=True),
        sa.Column("reason", _enum("drainreason", *_REASON), nullable=False),
        sa.Column(
            "status",
            _enum(
                "drainstatus",
                *("Accepted", "Running", "Canceling", "Succeeded", "PartiallySucceeded", "Failed", "Canceled"),
            ),
            nullable=False,
            index=True,
        ),
        sa.Column("max_parallel", sa.Integer, nullable=False),
        sa.Column("notice_s", sa.Float, nullable=False),
        sa.Column("window", sa.String(64), nullable=True),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("in_place_id", sa.String(64), nullable=True),
        sa.Column("in_place", sa.JSON, nullable=False),
        sa.Column("claimed_by", sa.String(64), nullable=True),
        sa.Column("lease_until", sa.Float, nullable=False),
        sa.Column("message", sa.String(1024), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("ended_at", sa.Float, nullable=True),
    )
    op.create_table(
        "drain_vms",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("drain", sa.String(36), sa.ForeignKey("drains.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("vm_id", sa.String(300), nullable=False, index=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("resource_group", sa.String(90), nullable=False),
        sa.Column("subscription", sa.String(64), nullable=False),
        sa.Column("host_vm_name", sa.String(63), nullable=False),
        sa.Column("memory_gib", sa.Integer, nullable=False),
        sa.Column(
            "method",
            _enum("drainmethod", "LiveMigration", "MemoryPreservingUpdate", "Redeploy", "None"),
            nullable=False,
        ),
        sa.Column(
            "step",
            _enum(
                "vmstep",
                *("Pending", "LiveScheduled", "LiveMigrating", "InPlaceWaiting", "InPlaceScheduled"),
                *("InPlaceRunning", "RedeployScheduled", "RedeployStopping", "RedeployStarting", "Done"),
            ),
            nullable=False,
        ),
        sa.Column("outcome", _enum("vmoutcome", "Succeeded", "Failed", "Blocked"), nullable=True),
        sa.Column("from_host", sa.String(63), nullable=False),
        sa.Column("to_host", sa.String(63), nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("tried_hosts", sa.JSON, nullable=False),
        sa.Column("operation", sa.String(36), nullable=True),
        sa.Column("event_id", sa.String(64), nullable=True),
        sa.Column("not_before", sa.Float, nullable=True),
        sa.Column("deadline", sa.Float, nullable=True),
        sa.Column("total_ms", sa.Float, nullable=True),
        sa.Column("downtime_ms", sa.Float, nullable=True),
        sa.Column("pause_ms", sa.Float, nullable=True),
        sa.Column("bytes", sa.BigInteger, nullable=True),
        sa.Column("progress", sa.JSON, nullable=False),
        sa.Column("reason", sa.String(1024), nullable=False),
        sa.Column("attestation_before", sa.JSON, nullable=False),
        sa.Column("attestation_after", sa.JSON, nullable=False),
        sa.Column("started_at", sa.Float, nullable=True),
        sa.Column("ended_at", sa.Float, nullable=True),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.UniqueConstraint("drain", "vm_id"),
    )
    op.create_table(
        "maintenance_windows",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("hosts", sa.JSON, nullable=False),
        sa.Column("start", sa.Float, nullable=False, index=True),
        sa.Column("duration_s", sa.Float, nullable=False),
        sa.Column("reason", _enum("windowreason", *_REASON), nullable=False),
        sa.Column("max_parallel", sa.Integer, nullable=False),
        sa.Column("notice_s", sa.Float, nullable=False),
        sa.Column(
            "status",
            _enum("windowstatus", "Scheduled", "Running", "Completed", "Expired", "Canceled"),
            nullable=False,
            index=True,
        ),
        sa.Column("drains", sa.JSON, nullable=False),
        sa.Column("message", sa.String(1024), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "scheduled_events",
        sa.Column("vm_id", sa.String(300), primary_key=True),
        sa.Column("host", sa.String(63), nullable=True),
        sa.Column("host_vm_name", sa.String(63), nullable=False),
        sa.Column("incarnation", sa.BigInteger, nullable=False),
        sa.Column("events", sa.JSON, nullable=False),
        sa.Column("published", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "scheduled_event_approvals",
        sa.Column("vm_id", sa.String(300), primary_key=True),
        sa.Column("event_id", sa.String(128), primary_key=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    for table in ("scheduled_event_approvals", "scheduled_events", "maintenance_windows", "drain_vms", "drains"):
        op.drop_table(table)
    with op.batch_alter_table("hosts") as batch:
        batch.drop_column("cordon_reason")
        batch.drop_column("cordoned")
