"""control layer: the host inventory — registration, heartbeats, availability and reconciliation.

A host registers with its identity and capacity; its name is bound to its chip id from then on (a
second registration of the name with another chip is refused: 409).  Heartbeats carry the host-side
names of the VMs it runs.  The leader's sweep marks hosts whose heartbeat is older than the timeout
``Unavailable`` and compares records with reports: a VM the controller places on a host that does not
report it gets power state ``unknown`` and an event — it is investigated, never re-created elsewhere.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from sqlalchemy import Table, bindparam, case, func, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from cvmotion.agent.pool import POOL_NAME_PATTERN
from cvmotion.control.db import Event, Host, Operation, Vm
from cvmotion.control.operations import OperationKind, Step
from cvmotion.control.placement import Candidate, NoHost
from cvmotion.control.resources import HostState, PowerState, ProvisioningState, Tcb, no_bool
from cvmotion.errors import Conflict, NotFound
from cvmotion.ipc.names import NAME_PATTERN

__all__ = ["Heartbeat", "HostRegistration", "Inventory", "PlacementContended"]

HOST_TYPE = "Cvmotion.Fabric/hosts"
_HOSTS: Table = Host.__table__  # type: ignore[assignment]
_VMS: Table = Vm.__table__  # type: ignore[assignment]
_OPS: Table = Operation.__table__  # type: ignore[assignment]
_CANDIDATE_COLUMNS = (
    _HOSTS.c.name, _HOSTS.c.pool, _HOSTS.c.product, _HOSTS.c.tcb, _HOSTS.c.state, _HOSTS.c.vcpus,
    _HOSTS.c.memory_gib, _HOSTS.c.cordoned, _HOSTS.c.chip_id,
)  # fmt: skip
# A VM uses its host, and — while a live migration of it is open — its destination too (Nova's migration
# claim): the move may land at any moment, and until it settles the source keeps the VM.  Without the second
# part every move asked for at once saw the same emptiest host (the fleet simulation's first seconds sent
# 176 moves to one host of 128 vCPUs, whose own drain then held the wave back) and could overfill it.
_INCOMING = (
    select(_OPS.c.target_host.label("host"), _VMS.c.vcpus, _VMS.c.memory_gib)
    .join(_VMS, _VMS.c.id == _OPS.c.resource_id)
    .where(
        _OPS.c.kind == OperationKind.MIGRATE,
        _OPS.c.step.not_in((Step.SUCCEEDED, Step.FAILED)),
        _OPS.c.target_host.is_not(None),
    )
)
_PLACED = select(_VMS.c.host.label("host"), _VMS.c.vcpus, _VMS.c.memory_gib).where(_VMS.c.host.is_not(None))
_CLAIMS = _PLACED.union_all(_INCOMING).subquery("claims")
_ONE = (
    select(
        *_CANDIDATE_COLUMNS,
        func.coalesce(func.sum(_CLAIMS.c.vcpus), 0),
        func.coalesce(func.sum(_CLAIMS.c.memory_gib), 0),
        func.count(_CLAIMS.c.host),
    )
    .select_from(_HOSTS.outerjoin(_CLAIMS, _CLAIMS.c.host == _HOSTS.c.name))
    .where(_HOSTS.c.name == bindparam("name"))
    .group_by(*_CANDIDATE_COLUMNS)
)
_USAGE = select(_CLAIMS.c.host, func.sum(_CLAIMS.c.vcpus), func.sum(_CLAIMS.c.memory_gib), func.count()).group_by(
    _CLAIMS.c.host
)


class PlacementContended(Exception):
    """A placement would have to wait for a host while holding another: retry its transaction from the start."""


class HostRegistration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    chip_id: str = Field(min_length=2, max_length=128, pattern=r"^[0-9a-f]+$")
    product: str = Field(pattern="^(Milan|Genoa|Turin)$")
    tcb: Tcb
    tcb_text: str = Field(default="", max_length=128)
    # Bound into VMs' migration policies at launch: the agents' pool name rule.
    pool: str = Field(pattern=f"^{POOL_NAME_PATTERN.pattern}$")
    region: str = Field(default="local", max_length=64)
    zone: str = Field(default="", max_length=16)
    vcpus: Annotated[int, Field(ge=1, le=4096), BeforeValidator(no_bool)]
    memory_gib: Annotated[int, Field(ge=1, le=65536), BeforeValidator(no_bool)]
    # A host name or IPv4 address (an IPv6 host by its name), an optional port and path.
    api_url: str = Field(pattern=r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[!-~]*)?$", max_length=256)
    migration_address: str = Field(max_length=256)
    vms: list[str] = Field(default_factory=list, max_length=4096)


class Heartbeat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vms: list[str] = Field(default_factory=list, max_length=4096)


class Inventory:
    def __init__(self, heartbeat_timeout: float) -> None:
        self.heartbeat_timeout = heartbeat_timeout

    def register(self, session: Session, body: HostRegistration) -> dict[str, Any]:
        row = session.get(Host, body.name, with_for_update=True)
        now = time.time()
        if row is not None and row.chip_id != body.chip_id:
            raise Conflict(
                f"host {body.name!r} is registered with chip {row.chip_id[:16]}..., not {body.chip_id[:16]}...:"
                " a host name stays bound to its chip (remove the record to re-use the name)"
            )
        if row is None:
            row = Host(name=body.name, chip_id=body.chip_id, registered_at=now)
            session.add(row)
        fields = body.model_dump(exclude={"name", "chip_id", "vms"})
        for key, value in fields.items():
            setattr(row, key, value)
        row.state = HostState.AVAILABLE
        row.reported_since = row.last_heartbeat or 0.0
        row.last_heartbeat = now
        row.reported_vms = sorted(body.vms)
        session.add(Event(type="HostRegistered", subject=f"/providers/{HOST_TYPE}/{body.name}", data=fields))
        session.flush()
        return self.resource(session, row)

    def heartbeat(self, session: Session, name: str, body: Heartbeat) -> dict[str, Any]:
        row = session.get(Host, name, with_for_update=True)
        if row is None:
            raise NotFound(f"host {name!r} is not registered")
        row.reported_since = row.last_heartbeat
        row.last_heartbeat = time.time()
        row.reported_vms = sorted(body.vms)
        if row.state is not HostState.AVAILABLE:
            row.state = HostState.AVAILABLE
            session.add(Event(type="HostAvailable", subject=f"/providers/{HOST_TYPE}/{name}", data={}))
        return {"name": name, "state": row.state.value}

    def sweep(self, session: Session, now: float | None = None) -> list[str]:
        """Mark silent hosts Unavailable and flag VMs their hosts do not report; returns what changed."""
        now = time.time() if now is None else now
        changed: list[str] = []
        for row in session.scalars(select(Host).where(Host.state == HostState.AVAILABLE)):
            if now - row.last_heartbeat > self.heartbeat_timeout:
                row.state = HostState.UNAVAILABLE
                changed.append(row.name)
                session.add(Event(type="HostUnavailable", subject=f"/providers/{HOST_TYPE}/{row.name}", data={}))
        # A report describes the host no earlier than ``reported_since`` (its daemon sends one at a time, so
        # it assembled the latest after the previous was answered); the receipt time alone is not enough: a
        # report assembled before a VM arrived, answered after the controller recorded the arrival, would
        # make the VM look missing.
        reports = {h.name: (set(h.reported_vms), h.reported_since) for h in session.scalars(select(Host))}
        settled = select(Vm).where(Vm.provisioning_state == ProvisioningState.SUCCEEDED, Vm.host.is_not(None))
        for vm in session.scalars(settled):
            names, reported_at = reports.get(vm.host or "", (set(), 0.0))
            present = vm.host_vm_name in names
            if reported_at <= vm.updated_at:
                continue  # no report assembled after the VM arrived there: nothing to compare yet
            if not present and vm.power_state is PowerState.RUNNING:
                vm.power_state = PowerState.UNKNOWN
                vm.status_message = f"host {vm.host} does not report this VM; under investigation"
                session.add(Event(type="VmMissingOnHost", subject=vm.id, data={"host": vm.host}))
                changed.append(vm.id)
            elif present and vm.power_state is PowerState.UNKNOWN:
                vm.power_state = PowerState.RUNNING
                vm.status_message = ""
                changed.append(vm.id)
        return changed

    def candidates(self, session: Session, *, lock: bool = False) -> list[Candidate]:
        """Every host with the capacity its VMs use (``lock``: host rows ``FOR UPDATE``).

        The host rows are locked *before* usage is summed: a placement that waited for another replica's
        lock then sees (READ COMMITTED) the VM rows that placement committed, so a host is never overfilled.
        Two Core statements (no ORM objects): this runs on every placement, inside its lock.
        """
        conn = session.connection()
        query = select(*_CANDIDATE_COLUMNS).order_by(_HOSTS.c.name)
        hosts = conn.execute(query.with_for_update() if lock else query).all()
        usage = {host: (vcpus or 0, mem or 0, count) for host, vcpus, mem, count in conn.execute(_USAGE)}
        out = []
        for name, pool, product, tcb, state, vcpus, memory_gib, cordoned, chip_id in hosts:
            used = usage.get(name, (0, 0, 0))
            out.append(
                Candidate(
                    name, pool, product, tcb, state, vcpus, memory_gib, used[0], used[1], used[2],
                    cordoned=bool(cordoned), chip_id=chip_id,
                )
            )  # fmt: skip
        return out

    def lock_first(
        self, session: Session, ranked: list[Candidate], check: Callable[[Candidate], str | None]
    ) -> Candidate:
        """Lock the best of ``ranked`` that another placement does not hold, and re-check it (``check``: why
        it cannot take the VM now) with its capacity counted after the lock; the next one if it fails.

        One host row is locked, not all: concurrent placements take different hosts (``SKIP LOCKED``) and
        proceed in parallel; when every fitting host is held, this waits for the best one.  Two placements
        onto one host still serialise on its row, and the second counts the first's VM (READ COMMITTED: the
        count is a statement after the lock).  SQLite serialises whole write transactions instead.

        Raises:
            NoHost: none of them can take the VM any more (the reasons name each).
        """
        conn = session.connection()
        remaining = [c.name for c in ranked]
        reasons: dict[str, str] = {}
        held: list[str] = []  # locked, but refused on the re-check: held until the transaction ends
        while remaining:
            name = remaining[0]
            if conn.dialect.name == "postgresql":
                order = case({n: i for i, n in enumerate(remaining)}, value=_HOSTS.c.name)
                free = select(_HOSTS.c.name).where(_HOSTS.c.name.in_(remaining)).order_by(order).limit(1)
                row = conn.execute(free.with_for_update(skip_locked=True)).first()
                if row is not None:
                    name = str(row[0])
                else:
                    # Every fitting host is being placed on: queue for one.  Holding a host, wait only for a
                    # later name than every one held, so no two placements can wait on each other (deadlock);
                    # else start over (the caller's transaction is retried, with fresh counts).
                    later = [n for n in remaining if not held or n > max(held)]
                    if not later:
                        raise PlacementContended(f"hosts {remaining} are held by other placements")
                    name = later[0]
                    conn.execute(select(_HOSTS.c.name).where(_HOSTS.c.name == name).with_for_update())
                held.append(name)
            fresh = self._candidate(conn, name)
            reason = "host record removed" if fresh is None else check(fresh)
            if fresh is not None and reason is None:
                return fresh
            reasons[name] = str(reason)
            remaining.remove(name)
        raise NoHost(reasons)

    @staticmethod
    def _candidate(conn: Connection, name: str) -> Candidate | None:
        row = conn.execute(_ONE, {"name": name}).first()
        if row is None:
            return None
        name, pool, product, tcb, state, vcpus, memory_gib, cordoned, chip_id, used_vcpus, used_mem, count = row
        return Candidate(
            name, pool, product, tcb, state, vcpus, memory_gib, int(used_vcpus), int(used_mem), int(count),
            cordoned=bool(cordoned), chip_id=chip_id,
        )  # fmt: skip

    def resource(self, session: Session, row: Host) -> dict[str, Any]:
        return {
            "id": f"/providers/{HOST_TYPE}/{row.name}",
            "name": row.name,
            "type": HOST_TYPE,
            "location": row.region,
            "properties": {
                "state": row.state.value,
                "pool": row.pool,
                "zone": row.zone,
                "product": row.product,
                "chipId": row.chip_id,
                "reportedTcb": row.tcb,
                "reportedTcbText": row.tcb_text,
                "capacity": {"vcpus": row.vcpus, "memoryGiB": row.memory_gib},
                "apiUrl": row.api_url,
                "migrationAddress": row.migration_address,
                "lastHeartbeat": row.last_heartbeat,
                "reportedVms": row.reported_vms,
                "cordoned": row.cordoned,
                "cordonReason": row.cordon_reason or None,
            },
        }

    def list_hosts(self, session: Session) -> list[dict[str, Any]]:
        return [self.resource(session, h) for h in session.scalars(select(Host).order_by(Host.name))]

    def get(self, session: Session, name: str) -> Host:
        row = session.get(Host, name)
        if row is None:
            raise NotFound(f"host {name!r} is not registered")
        return row
