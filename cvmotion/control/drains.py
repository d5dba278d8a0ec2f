"""control layer: drain requests — cordon a host, record a drain with one ladder row per VM, cancel, uncordon.

A request is decided in one transaction (host row locked): an unknown host is 404, a host with a drain
still running is 409 (``drains.active_host`` is unique, so two replicas cannot both start one), and the
host is cordoned in the same commit, so no placement chooses it from then on.  The VMs drained are the
VMs the controller records on the host at that moment (none can be added: it is cordoned).  The drain
runner (``control.drain_runner``) then carries the drain out; these functions only record what is asked.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from cvmotion.control.db import Event, Host, ResourceGroup, Vm
from cvmotion.control.db_maintenance import Drain, DrainVm
from cvmotion.control.drainstates import ACTIVE_DRAIN, DrainMethod, DrainReason, DrainStatus, VmStep
from cvmotion.control.resources import no_bool
from cvmotion.errors import Conflict, NotFound

__all__ = [
    "DEFAULT_MAX_PARALLEL",
    "DrainRequest",
    "active_drain",
    "cancel_drain",
    "drain_view",
    "host_subject",
    "latest_drain",
    "list_drains",
    "start_drain",
    "uncordon",
]

DEFAULT_MAX_PARALLEL = 2  # KubeVirt's parallelOutboundMigrationsPerNode


def host_subject(name: str) -> str:
    return f"/providers/Cvmotion.Fabric/hosts/{name}"


class DrainRequest(BaseModel):
    """``POST /providers/Cvmotion.Fabric/hosts/{name}/drain``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    reason: Literal["SecurityUpdate", "HardwareRefresh"]
    max_parallel: Annotated[int, Field(ge=1, le=64), BeforeValidator(no_bool)] = Field(
        default=DEFAULT_MAX_PARALLEL, alias="maxParallel", description="live moves out of this host at once"
    )
    notice_seconds: Annotated[float | None, Field(ge=0, le=7 * 86400), BeforeValidator(no_bool)] = Field(
        default=None,
        alias="noticeSeconds",
        description="NotBefore of each Scheduled Event, from when it is scheduled (default: the controller's)",
    )


class CordonRequest(BaseModel):
    """``POST /providers/Cvmotion.Fabric/hosts/{name}/cordon`` (the body may be empty)."""

    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str, Field(max_length=256)] = Field(default="cordoned by an operator", description="why")


def active_drain(session: Session, host: str) -> Drain | None:
    return session.scalars(select(Drain).where(Drain.active_host == host)).first()


def latest_drain(session: Session, host: str) -> Drain | None:
    return session.scalars(select(Drain).where(Drain.host == host).order_by(Drain.created_at.desc())).first()


def start_drain(
    session: Session,
    host_name: str,
    reason: DrainReason,
    *,
    max_parallel: int,
    notice_s: float,
    window: str | None = None,
) -> Drain:
    """Cordon the host and record the drain of every VM on it.

    Raises:
        NotFound: no such host.
        Conflict: a drain of the host is still running.
    """
    host = session.get(Host, host_name, with_for_update=True)
    if host is None:
        raise NotFound(f"host {host_name!r} is not registered")
    running = active_drain(session, host_name)
    if running is not None:
        raise Conflict(
            f"host {host_name!r} is already being drained (drain {running.id}, {running.status.value});"
            " wait for it to end or cancel it"
        )
    now = time.time()
    drain = Drain(
        id=str(uuid.uuid4()),
        host=host_name,
        active_host=host_name,
        reason=reason,
        status=DrainStatus.ACCEPTED,
        max_parallel=max_parallel,
        notice_s=notice_s,
        window=window,
        cancel_requested=False,
        in_place={},
        lease_until=0.0,
        message="",
        created_at=now,
        updated_at=now,
    )
    session.add(drain)
    host.cordoned, host.cordon_reason = True, f"drain {drain.id} ({reason.value})"
    names = []
    for vm in session.scalars(select(Vm).where(Vm.host == host_name).order_by(Vm.id)):
        group = session.get(ResourceGroup, vm.resource_group)
        names.append(vm.name)
        session.add(
            DrainVm(
                drain=drain.id,
                vm_id=vm.id,
                name=vm.name,
                resource_group=group.name if group else vm.resource_group.rsplit("/", 1)[-1],
                subscription=vm.subscription,
                host_vm_name=vm.host_vm_name,
                memory_gib=vm.memory_gib,
                method=DrainMethod.NONE,
                step=VmStep.PENDING,
                from_host=host_name,
                attempts=0,
                tried_hosts=[],
                progress={},
                reason="",
                attestation_before={},
                attestation_after={},
                updated_at=now,
            )
        )
    data = {"host": host_name, "drain": drain.id, "reason": reason.value, "vms": names, "window": window}
    session.add(Event(type="cvmotion.maintenance.scheduled", subject=host_subject(host_name), data=data))
    session.flush()
    return drain


def cancel_drain(session: Session, host_name: str) -> Drain:
    """No new step starts; steps in flight finish; the drain ends ``Canceled`` (the host stays cordoned)."""
    if session.get(Host, host_name) is None:
        raise NotFound(f"host {host_name!r} is not registered")
    drain = active_drain(session, host_name)
    if drain is None:
        raise Conflict(f"no drain of host {host_name!r} is running")
    drain = session.get(Drain, drain.id, with_for_update=True) or drain
    drain.cancel_requested = True
    drain.status = DrainStatus.CANCELING
    drain.updated_at = time.time()
    return drain


def cordon(session: Session, host_name: str, reason: str) -> Host:
    """Mark the host unschedulable (``kubectl cordon``): no VM is placed on it; those it runs stay.  Idempotent:
    a host already cordoned keeps the reason it was cordoned for."""
    host = session.get(Host, host_name, with_for_update=True)
    if host is None:
        raise NotFound(f"host {host_name!r} is not registered")
    if not host.cordoned:
        host.cordoned, host.cordon_reason = True, reason[:256]
        data = {"host": host_name, "reason": host.cordon_reason}
        session.add(Event(type="HostCordoned", subject=host_subject(host_name), data=data))
    return host


def uncordon(session: Session, host_name: str) -> Host:
    host = session.get(Host, host_name, with_for_update=True)
    if host is None:
        raise NotFound(f"host {host_name!r} is not registered")
    running = active_drain(session, host_name)
    if running is not None:
        raise Conflict(f"host {host_name!r} is being drained (drain {running.id}): cancel the drain first")
    if host.cordoned:
        host.cordoned, host.cordon_reason = False, ""
        session.add(Event(type="HostUncordoned", subject=host_subject(host_name), data={"host": host_name}))
    return host


def _vm_view(row: DrainVm) -> dict[str, Any]:
    return {
        "name": row.name,
        "resourceGroup": row.resource_group,
        "subscription": row.subscription,
        "method": row.method.value,
        "step": row.step.value,
        "outcome": row.outcome.value if row.outcome else None,
        "from": row.from_host,
        "to": row.to_host,
        "downtimeMs": row.downtime_ms,
        "pauseMs": row.pause_ms,
        "totalMs": row.total_ms,
        "bytes": row.bytes,
        "attempts": row.attempts,
        "reason": row.reason or None,
        "progress": row.progress or None,
        "scheduledEventId": row.event_id,
        "notBefore": row.not_before,
        "attestation": {"before": row.attestation_before, "after": row.attestation_after},
    }


def drain_view(session: Session, drain: Drain) -> dict[str, Any]:
    rows = session.scalars(select(DrainVm).where(DrainVm.drain == drain.id).order_by(DrainVm.id))
    return {
        "id": drain.id,
        "host": drain.host,
        "reason": drain.reason.value,
        "status": drain.status.value,
        "active": drain.status in ACTIVE_DRAIN,
        "maxParallel": drain.max_parallel,
        "noticeSeconds": drain.notice_s,
        "window": drain.window,
        "inPlaceUpdate": drain.in_place or None,
        "message": drain.message or None,
        "createdAt": drain.created_at,
        "endedAt": drain.ended_at,
        "vms": [_vm_view(r) for r in rows],
    }


def list_drains(session: Session, *, active_only: bool = False, limit: int = 100) -> list[dict[str, Any]]:
    query = select(Drain).order_by(Drain.created_at.desc()).limit(limit)
    if active_only:
        query = query.where(Drain.status.in_(ACTIVE_DRAIN))
    return [drain_view(session, d) for d in session.scalars(query)]
