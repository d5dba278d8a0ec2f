"""control layer: the maintenance tables — drains, each drained VM's ladder, windows, Scheduled Events.

Created by the Alembic revision ``0002_maintenance``.  A host's cordon is two columns of ``hosts``
(``db.Host.cordoned``, ``cordon_reason``).  One active drain per host is a unique column, not a check:
``drains.active_host`` holds the host's name while the drain runs and NULL once it ended (NULLs are
distinct in SQLite and PostgreSQL), so two replicas racing to drain one host cannot both insert.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import BigInteger, Float, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from cvmotion.control.db import Base, _enum
from cvmotion.control.drainstates import DrainMethod, DrainReason, DrainStatus, VmOutcome, VmStep, WindowStatus

__all__ = ["Drain", "DrainVm", "EventApproval", "MaintenanceWindow", "ScheduledEventsDoc"]


class Drain(Base):
    __tablename__ = "drains"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    host: Mapped[str] = mapped_column(String(63), index=True)
    active_host: Mapped[str | None] = mapped_column(String(63), unique=True, nullable=True)
    reason: Mapped[DrainReason] = mapped_column(_enum(DrainReason))
    status: Mapped[DrainStatus] = mapped_column(_enum(DrainStatus), index=True)
    max_parallel: Mapped[int] = mapped_column(Integer)  # live moves out of this host at once
    notice_s: Mapped[float] = mapped_column(Float)  # NotBefore = when an event is scheduled + this
    window: Mapped[str | None] = mapped_column(String(64), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    in_place_id: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the host's maintenance id
    in_place: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the host's record, last seen
    claimed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_until: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(String(1024), default="")
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    updated_at: Mapped[float] = mapped_column(Float, default=time.time)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class DrainVm(Base):
    """One VM's way down the ladder in one drain: every step and its measurements."""

    __tablename__ = "drain_vms"
    __table_args__ = (UniqueConstraint("drain", "vm_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    drain: Mapped[str] = mapped_column(ForeignKey("drains.id", ondelete="CASCADE"), index=True)
    vm_id: Mapped[str] = mapped_column(String(300), index=True)  # no foreign key: the VM may be deleted meanwhile
    name: Mapped[str] = mapped_column(String(64))
    resource_group: Mapped[str] = mapped_column(String(90))
    subscription: Mapped[str] = mapped_column(String(64))
    host_vm_name: Mapped[str] = mapped_column(String(63))
    memory_gib: Mapped[int] = mapped_column(Integer)
    method: Mapped[DrainMethod] = mapped_column(_enum(DrainMethod))
    step: Mapped[VmStep] = mapped_column(_enum(VmStep))
    outcome: Mapped[VmOutcome | None] = mapped_column(_enum(VmOutcome), nullable=True)
    from_host: Mapped[str] = mapped_column(String(63))
    to_host: Mapped[str | None] = mapped_column(String(63), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # live migrations tried (at most 2)
    tried_hosts: Mapped[list[Any]] = mapped_column(default=list)  # destinations that failed
    operation: Mapped[str | None] = mapped_column(String(36), nullable=True)  # the Migrate operation in flight
    event_id: Mapped[str | None] = mapped_column(String(64), nullable=True)  # its Scheduled Event
    not_before: Mapped[float | None] = mapped_column(Float, nullable=True)
    deadline: Mapped[float | None] = mapped_column(Float, nullable=True)  # the live move's completion timeout
    total_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    downtime_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    pause_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)  # round, remaining, mbps (query-migrate)
    reason: Mapped[str] = mapped_column(String(1024), default="")  # why it fell back, is blocked or failed
    attestation_before: Mapped[dict[str, Any]] = mapped_column(default=dict)
    attestation_after: Mapped[dict[str, Any]] = mapped_column(default=dict)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    updated_at: Mapped[float] = mapped_column(Float, default=time.time)


class MaintenanceWindow(Base):
    """A window (Azure's maintenance configuration, scope Host): its hosts are drained in order once it opens."""

    __tablename__ = "maintenance_windows"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    hosts: Mapped[list[Any]] = mapped_column(default=list)
    start: Mapped[float] = mapped_column(Float, index=True)
    duration_s: Mapped[float] = mapped_column(Float)
    reason: Mapped[DrainReason] = mapped_column(_enum(DrainReason))
    max_parallel: Mapped[int] = mapped_column(Integer)
    notice_s: Mapped[float] = mapped_column(Float)
    status: Mapped[WindowStatus] = mapped_column(_enum(WindowStatus), index=True)
    drains: Mapped[list[Any]] = mapped_column(default=list)  # the drain ids it started, in host order
    message: Mapped[str] = mapped_column(String(1024), default="")
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    updated_at: Mapped[float] = mapped_column(Float, default=time.time)


class ScheduledEventsDoc(Base):
    """A VM's Scheduled Events document as the controller last wrote it, and what its host acknowledged."""

    __tablename__ = "scheduled_events"
    vm_id: Mapped[str] = mapped_column(String(300), primary_key=True)
    host: Mapped[str | None] = mapped_column(String(63), nullable=True)  # where it is published
    host_vm_name: Mapped[str] = mapped_column(String(63))
    incarnation: Mapped[int] = mapped_column(BigInteger, default=0)
    events: Mapped[list[Any]] = mapped_column(default=list)
    published: Mapped[int] = mapped_column(BigInteger, default=-1)  # the incarnation the host stored; -1: none
    updated_at: Mapped[float] = mapped_column(Float, default=time.time)


class EventApproval(Base):
    """An early start of a Scheduled Event: by the owner (controller API) or the guest (its host's startRequests)."""

    __tablename__ = "scheduled_event_approvals"
    vm_id: Mapped[str] = mapped_column(String(300), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    source: Mapped[str] = mapped_column(String(16))  # "owner" | "guest"
    at: Mapped[float] = mapped_column(Float, default=time.time)
