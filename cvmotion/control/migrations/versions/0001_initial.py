"""control layer: the first schema — resource groups, hosts, VMs, operations, policy, tokens, events.

Revision ID: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _now() -> sa.Column[float]:
    return sa.Column("created_at", sa.Float, nullable=False)


def upgrade() -> None:
    op.create_table(
        "resource_groups",
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("subscription", sa.String(64), nullable=False, index=True),
        sa.Column("name", sa.String(90), nullable=False),
        sa.Column("location", sa.String(64), nullable=False),
        _now(),
    )
    op.create_table(
        "hosts",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("chip_id", sa.String(128), nullable=False),
        sa.Column("product", sa.String(16), nullable=False),
        sa.Column("tcb", sa.BigInteger, nullable=False),
        sa.Column("tcb_text", sa.String(128), nullable=False),
        sa.Column("pool", sa.String(64), nullable=False, index=True),
        sa.Column("region", sa.String(64), nullable=False),
        sa.Column("zone", sa.String(16), nullable=False),
        sa.Column("vcpus", sa.Integer, nullable=False),
        sa.Column("memory_gib", sa.Integer, nullable=False),
        sa.Column("api_url", sa.String(256), nullable=False),
        sa.Column("migration_address", sa.String(256), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("last_heartbeat", sa.Float, nullable=False),
        sa.Column("registered_at", sa.Float, nullable=False),
        sa.Column("reported_vms", sa.JSON, nullable=False),
    )
    op.create_table(
        "vms",
        sa.Column("id", sa.String(300), primary_key=True),
        sa.Column("subscription", sa.String(64), nullable=False, index=True),
        sa.Column("resource_group", sa.String(200), sa.ForeignKey("resource_groups.id"), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("location", sa.String(64), nullable=False),
        sa.Column("tags", sa.JSON, nullable=False),
        sa.Column("vm_size", sa.String(64), nullable=False),
        sa.Column("vcpus", sa.Integer, nullable=False),
        sa.Column("memory_gib", sa.Integer, nullable=False),
        sa.Column("image", sa.String(4096), nullable=False),
        sa.Column("cmdline", sa.String(3000), nullable=False),
        sa.Column("os_type", sa.String(16), nullable=False),
        sa.Column("clm", sa.String(32), nullable=False),
        sa.Column("placement", sa.JSON, nullable=False),
        sa.Column("allowed_pools", sa.JSON, nullable=False),
        sa.Column("provisioning_state", sa.String(32), nullable=False),
        sa.Column("power_state", sa.String(32), nullable=False),
        sa.Column("host", sa.String(63), nullable=True, index=True),
        sa.Column("host_vm_name", sa.String(63), nullable=False),
        sa.Column("attestation", sa.JSON, nullable=False),
        sa.Column("status_message", sa.String(1024), nullable=False),
        _now(),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.UniqueConstraint("resource_group", "name"),
    )
    op.create_table(
        "operations",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("step", sa.String(32), nullable=False, index=True),
        sa.Column("resource_id", sa.String(300), nullable=False, index=True),
        sa.Column("subscription", sa.String(64), nullable=False),
        sa.Column("host", sa.String(63), nullable=True),
        sa.Column("target_host", sa.String(63), nullable=True),
        sa.Column("migration_id", sa.String(64), nullable=True),
        sa.Column("claimed_by", sa.String(64), nullable=True),
        sa.Column("lease_until", sa.Float, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("error_code", sa.String(64), nullable=False),
        sa.Column("error_message", sa.String(2048), nullable=False),
        _now(),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "policy_definitions",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("document", sa.JSON, nullable=False),
        sa.Column("builtin", sa.Boolean, nullable=False),
        _now(),
    )
    op.create_table(
        "policy_assignments",
        sa.Column("id", sa.String(400), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("scope", sa.String(200), nullable=False, index=True),
        sa.Column("definition", sa.String(128), sa.ForeignKey("policy_definitions.name"), nullable=False),
        sa.Column("parameters", sa.JSON, nullable=False),
        _now(),
    )
    op.create_table(
        "compliance_results",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("assignment", sa.String(400), nullable=False, index=True),
        sa.Column("resource_id", sa.String(300), nullable=False),
        sa.Column("compliant", sa.Boolean, nullable=False),
        sa.Column("effect", sa.String(16), nullable=False),
        sa.Column("at", sa.Float, nullable=False),
    )
    op.create_table(
        "tokens",
        sa.Column("digest", sa.String(64), primary_key=True),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("subscription", sa.String(64), nullable=False),
        _now(),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(400), nullable=False),
        sa.Column("data", sa.JSON, nullable=False),
        sa.Column("time", sa.Float, nullable=False),
    )


def downgrade() -> None:
    for table in (
        "events", "tokens", "compliance_results", "policy_assignments", "policy_definitions",
        "operations", "vms", "hosts", "resource_groups",
    ):  # fmt: skip
        op.drop_table(table)
