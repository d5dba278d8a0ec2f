"""control layer: the controller's tables (SQLAlchemy 2) and opening a database at the schema's head.

SQLite (the default, a file in the data directory) and PostgreSQL (``postgresql://``, for several
replicas) run the same schema; Alembic migrations under ``control/migrations`` create and upgrade it
when the controller starts.  SQLite write transactions start with ``BEGIN IMMEDIATE`` so two writers
queue on the lock instead of failing with "database is locked" when a read upgrades to a write.
"""

from __future__ import annotations

import enum
import time
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from cvmotion.control import outbox
from cvmotion.control.operations import OperationKind, Step
from cvmotion.control.resources import ClmSetting, HostState, PowerState, ProvisioningState
from cvmotion.errors import UsageError

__all__ = [
    "Assignment",
    "reader_for",
    "Base",
    "ComplianceResult",
    "Definition",
    "DeliveryState",
    "Event",
    "Host",
    "Operation",
    "ResourceGroup",
    "Token",
    "Vm",
    "Webhook",
    "WebhookDelivery",
    "open_database",
]


def _enum(cls: type[enum.Enum]) -> Enum:
    # Stored as the member's value in a VARCHAR: the same on SQLite and PostgreSQL, readable in psql.
    return Enum(cls, native_enum=False, length=32, values_callable=lambda e: [m.value for m in e])


class Uint64(TypeDecorator[int]):
    """An unsigned 64-bit value (a raw TCB) in a signed BIGINT column: stored as its two's complement."""

    impl = BigInteger
    cache_ok = True

    def process_bind_param(self, value: int | None, dialect: Dialect) -> int | None:
        return value - (1 << 64) if value is not None and value >= 1 << 63 else value

    def process_result_value(self, value: int | None, dialect: Dialect) -> int | None:
        return value + (1 << 64) if value is not None and value < 0 else value


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class ResourceGroup(Base):
    __tablename__ = "resource_groups"
    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    subscription: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(90))
    location: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class Host(Base):
    __tablename__ = "hosts"
    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    chip_id: Mapped[str] = mapped_column(String(128))
    product: Mapped[str] = mapped_column(String(16))
    tcb: Mapped[int] = mapped_column(Uint64)  # reported TCB, the raw 64-bit value (ordered per product)
    tcb_text: Mapped[str] = mapped_column(String(128))
    pool: Mapped[str] = mapped_column(String(64), index=True)
    region: Mapped[str] = mapped_column(String(64))
    zone: Mapped[str] = mapped_column(String(16))
    vcpus: Mapped[int] = mapped_column(Integer)
    memory_gib: Mapped[int] = mapped_column(Integer)
    api_url: Mapped[str] = mapped_column(String(256))
    migration_address: Mapped[str] = mapped_column(String(256))
    state: Mapped[HostState] = mapped_column(_enum(HostState))
    last_heartbeat: Mapped[float] = mapped_column(Float)
    # When the report before the latest arrived: the latest was assembled after it (one report at a time).
    reported_since: Mapped[float] = mapped_column(Float, default=0.0)
    registered_at: Mapped[float] = mapped_column(Float, default=time.time)
    reported_vms: Mapped[list[Any]] = mapped_column(default=list)  # host-side names it says it runs
    # Cordoned (a drain or an operator): never a placement target, whatever its state, until uncordoned.
    cordoned: Mapped[bool] = mapped_column(default=False)
    cordon_reason: Mapped[str] = mapped_column(String(256), default="")


class Vm(Base):
    __tablename__ = "vms"
    __table_args__ = (UniqueConstraint("resource_group", "name"),)
    id: Mapped[str] = mapped_column(String(300), primary_key=True)  # lower-cased resource id
    subscription: Mapped[str] = mapped_column(String(64), index=True)
    resource_group: Mapped[str] = mapped_column(ForeignKey("resource_groups.id"))
    name: Mapped[str] = mapped_column(String(64))
    location: Mapped[str] = mapped_column(String(64))
    tags: Mapped[dict[str, Any]] = mapped_column(default=dict)
    vm_size: Mapped[str] = mapped_column(String(64))
    vcpus: Mapped[int] = mapped_column(Integer)
    memory_gib: Mapped[int] = mapped_column(Integer)
    image: Mapped[str] = mapped_column(String(4096))
    cmdline: Mapped[str] = mapped_column(String(3000))
    os_type: Mapped[str] = mapped_column(String(16))
    clm: Mapped[ClmSetting] = mapped_column(_enum(ClmSetting))
    placement: Mapped[dict[str, Any]] = mapped_column(default=dict)
    allowed_pools: Mapped[list[Any]] = mapped_column(default=list)  # bound into the launch (HOST_DATA)
    provisioning_state: Mapped[ProvisioningState] = mapped_column(_enum(ProvisioningState))
    power_state: Mapped[PowerState] = mapped_column(_enum(PowerState))
    host: Mapped[str | None] = mapped_column(String(63), index=True, nullable=True)
    host_vm_name: Mapped[str] = mapped_column(String(63))
    attestation: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status_message: Mapped[str] = mapped_column(String(1024), default="")
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    updated_at: Mapped[float] = mapped_column(Float, default=time.time)


class Operation(Base):
    __tablename__ = "operations"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[OperationKind] = mapped_column(_enum(OperationKind))
    step: Mapped[Step] = mapped_column(_enum(Step), index=True)
    resource_id: Mapped[str] = mapped_column(String(300), index=True)
    subscription: Mapped[str] = mapped_column(String(64))
    host: Mapped[str | None] = mapped_column(String(63), nullable=True)  # where it acts (source for a move)
    target_host: Mapped[str | None] = mapped_column(String(63), nullable=True)
    migration_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    claimed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_until: Mapped[float] = mapped_column(Float, default=0.0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error_code: Mapped[str] = mapped_column(String(64), default="")
    error_message: Mapped[str] = mapped_column(String(2048), default="")
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    updated_at: Mapped[float] = mapped_column(Float, default=time.time)
    # A started migration whose source has not answered since then (None: it answers); see worker.
    source_silent_since: Mapped[float | None] = mapped_column(Float, nullable=True, default=None)


class Definition(Base):
    __tablename__ = "policy_definitions"
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    document: Mapped[dict[str, Any]] = mapped_column()
    builtin: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class Assignment(Base):
    __tablename__ = "policy_assignments"
    id: Mapped[str] = mapped_column(String(400), primary_key=True)  # {scope}/providers/.../policyAssignments/{name}
    name: Mapped[str] = mapped_column(String(128))
    scope: Mapped[str] = mapped_column(String(200), index=True)
    definition: Mapped[str] = mapped_column(ForeignKey("policy_definitions.name"))
    parameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class ComplianceResult(Base):
    __tablename__ = "compliance_results"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    assignment: Mapped[str] = mapped_column(String(400), index=True)
    resource_id: Mapped[str] = mapped_column(String(300))
    compliant: Mapped[bool] = mapped_column()
    effect: Mapped[str] = mapped_column(String(16))
    at: Mapped[float] = mapped_column(Float, default=time.time)


class Token(Base):
    __tablename__ = "tokens"
    digest: Mapped[str] = mapped_column(String(64), primary_key=True)  # SHA-256 of the bearer token
    role: Mapped[str] = mapped_column(String(32))
    subscription: Mapped[str] = mapped_column(String(64))  # "*" for every subscription
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class Event(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    type: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(400))
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    time: Mapped[float] = mapped_column(Float, default=time.time)


Index("ix_events_type", Event.type)  # the metrics aggregate events of a few types at every scrape
outbox.install()  # a transaction's events are inserted at its commit, their ids in commit order


class DeliveryState(enum.Enum):
    PENDING = "Pending"  # due at next_attempt_at (claimed while an attempt is in flight)
    SUCCEEDED = "Succeeded"
    DEAD_LETTERED = "DeadLettered"  # every attempt failed; kept for the operator (and a manual redelivery)


class Webhook(Base):
    __tablename__ = "webhooks"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    scope: Mapped[str] = mapped_column(String(64))  # the subscription whose events it receives; "*" for all
    url: Mapped[str] = mapped_column(String(2048))
    types: Mapped[list[Any]] = mapped_column(default=list)  # rendered type patterns; empty: every type
    subject: Mapped[str] = mapped_column(String(400), default="")  # subject prefix; empty: every subject
    secret: Mapped[str] = mapped_column(String(128))  # whsec_...: the controller signs with it, so it is kept
    max_attempts: Mapped[int] = mapped_column(Integer)
    cursor: Mapped[int] = mapped_column(Integer, default=0)  # the newest event id fanned out to deliveries
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class WebhookDelivery(Base):
    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("webhook", "event_id"),
        Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    webhook: Mapped[str] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"), index=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("events.id"))
    state: Mapped[DeliveryState] = mapped_column(_enum(DeliveryState))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float)
    claimed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_until: Mapped[float] = mapped_column(Float, default=0.0)
    last_status: Mapped[int] = mapped_column(Integer, default=0)  # the receiver's HTTP status; 0: no answer
    last_error: Mapped[str] = mapped_column(String(512), default="")
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    updated_at: Mapped[float] = mapped_column(Float, default=time.time)


def _sqlite_pragmas(engine: Engine, *, immediate: bool) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # SQLAlchemy's BEGIN below, not the driver's implicit one
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=10000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        # Writers take the lock up front; readers get a WAL snapshot and never wait for a writer.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def database_url(db: str | None, data_dir: Path) -> str:
    """``--db`` as given, or SQLite in the data directory; ``postgresql://`` selects psycopg 3."""
    if not db:
        return f"sqlite:///{data_dir / 'controller.db'}"
    if db.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + db.split("://", 1)[1]
    if db.startswith(("sqlite:///", "postgresql+psycopg://")):
        return db
    raise UsageError(f"--db {db!r}: expected sqlite:///PATH or postgresql://USER@HOST:PORT/DB")


def open_database(url: str) -> Engine:
    """An engine for ``url`` with the schema migrated to head (Alembic, run in-process)."""
    from alembic import command
    from alembic.config import Config

    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10}, pool_size=50)
        _sqlite_pragmas(engine, immediate=True)
    else:
        # The API's thread pool (40) plus workers, sweep and the leader's connection.
        engine = create_engine(url, pool_size=50, max_overflow=10, pool_pre_ping=True)
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
    return engine


def reader_for(engine: Engine) -> Engine:
    """An engine for read-only transactions: on SQLite a second pool whose transactions are deferred."""
    if engine.dialect.name != "sqlite":
        return engine
    reader = create_engine(engine.url, connect_args={"check_same_thread": False, "timeout": 10}, pool_size=50)
    _sqlite_pragmas(reader, immediate=False)
    return reader
