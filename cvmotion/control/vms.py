"""control layer: VM resources — create, update, delete and move requests become rows and operations.

A request is judged in one transaction: schema, size, policy (a ``deny`` is a 403 naming the
assignment), placement (the host is chosen and its capacity taken here, so ``--host`` that cannot take
the VM is refused at once), then the VM row and its operation row are written together.  The worker
(``control.worker``) carries the operation out against the host's API.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Insert, Table, bindparam, insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from cvmotion.abi.sku import find_sku
from cvmotion.agent.policy import MigrationPolicy
from cvmotion.control.db import Event, Host, Operation, ResourceGroup, Vm
from cvmotion.control.errors import InvalidRequest, RequestDisallowedByPolicy
from cvmotion.control.inventory import Inventory
from cvmotion.control.operations import OperationKind, Step
from cvmotion.control.placement import Candidate, Demand, NoHost, choose_host, rank_hosts, rejects
from cvmotion.control.policy_store import PolicyStore
from cvmotion.control.resources import (
    VM_TYPE,
    ClmSetting,
    HostState,
    PowerState,
    ProvisioningState,
    VmPatch,
    VmPut,
    check_name,
    host_vm_name,
    rg_id,
    vm_id,
)
from cvmotion.errors import Conflict, NotFound, UsageError
from cvmotion.vmm.layout import GIB

__all__ = ["VmService"]

_BUSY = (ProvisioningState.CREATING, ProvisioningState.DELETING, ProvisioningState.MIGRATING)
_VMS: Table = Vm.__table__  # type: ignore[assignment]  # Core statements on the create path: no ORM flush
_OPS: Table = Operation.__table__  # type: ignore[assignment]
# Built once: a statement object per call costs more than the SQLite round trip it makes.
_VM_EXISTS = select(_VMS.c.id).where(_VMS.c.id == bindparam("id"))
_OP_INSERT = insert(_OPS)
_INSERT_IGNORE: dict[tuple[str, str], Insert] = {}


def _insert_ignore(conn: Connection, table: Table) -> Insert:
    """``INSERT … ON CONFLICT DO NOTHING`` on SQLite and PostgreSQL (with ``RETURNING``: no row when the key
    exists; psycopg reports no rowcount for it)."""
    key = (conn.dialect.name, table.name)
    stmt = _INSERT_IGNORE.get(key)
    if stmt is None:
        dialect_insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
        stmt = _INSERT_IGNORE[key] = dialect_insert(table).on_conflict_do_nothing().returning(*table.primary_key)
    return stmt


def policy_doc(vm: Vm, *, host_pool: str | None = None, host: str | None = None) -> dict[str, Any]:
    """The ARM body policy rules see; ``host_pool``/``host`` fill the Cvmotion.Fabric aliases."""
    props: dict[str, Any] = {
        "hardwareProfile": {"vmSize": vm.vm_size},
        "securityProfile": {"securityType": "ConfidentialVM", "confidentialLiveMigration": vm.clm.value},
        "storageProfile": {"imageReference": {"id": vm.image}},
        "osProfile": {"cmdline": vm.cmdline, "osType": vm.os_type},
    }
    if host_pool is not None:
        props["extended"] = {"hostPool": host_pool, "hostName": host}
    return {
        "id": vm.id,
        "name": vm.name,
        "type": VM_TYPE,
        "location": vm.location,
        "tags": vm.tags,
        "properties": props,
    }


class VmService:
    def __init__(self, policy: PolicyStore, inventory: Inventory) -> None:
        self.policy = policy
        self.inventory = inventory
        self._known_groups: dict[str, str] = {}

    # -- lookups -----------------------------------------------------------------------------------

    def get(self, session: Session, sub: str, rg: str, name: str, *, lock: bool = False) -> Vm:
        row = session.get(Vm, vm_id(sub, rg, name).lower(), with_for_update=lock)
        if row is None:
            raise NotFound(f"virtual machine {name!r} does not exist in resource group {rg!r}")
        return row

    def list_vms(self, session: Session, sub: str, rg: str | None) -> list[Vm]:
        query = select(Vm).where(Vm.subscription == sub).order_by(Vm.id)
        if rg is not None:
            query = query.where(Vm.resource_group == rg_id(sub, rg).lower())
        return list(session.scalars(query))

    def _ensure_rg(self, session: Session, sub: str, rg: str, location: str) -> tuple[str, str]:
        """The group's key (created if new) and its name as first written."""
        check_name("subscriptions", sub)
        check_name("resourceGroups", rg)
        key = rg_id(sub, rg).lower()
        known = self._known_groups.get(key)
        if known is not None:  # groups are never deleted: one lookup per process is enough
            return key, known
        group = session.get(ResourceGroup, key)
        if group is not None:
            self._known_groups[key] = group.name  # committed by another transaction: safe to remember
            return key, group.name
        # Two first PUTs into a new group may race (PostgreSQL replicas, concurrent requests): the second
        # insert is a no-op, not an integrity error.
        conn = session.connection()
        row = {"id": key, "subscription": sub, "name": rg, "location": location, "created_at": time.time()}
        conn.execute(_insert_ignore(conn, ResourceGroup.__table__), row)  # type: ignore[arg-type]
        return key, rg

    # -- placement ---------------------------------------------------------------------------------

    def _pool_filter(self, session: Session, vm: Vm, assignments: list[Any]) -> Callable[[str], bool]:
        """Whether the policy in scope lets ``vm`` onto a host of a pool (memoised per pool for one request)."""
        verdicts: dict[str, bool] = {}

        def allowed(pool: str) -> bool:
            if pool not in verdicts:
                try:
                    self.policy.judge(session, policy_doc(vm, host_pool=pool), record=False, assignments=assignments)
                    verdicts[pool] = True
                except RequestDisallowedByPolicy:
                    verdicts[pool] = False
            return verdicts[pool]

        return allowed

    def _place(
        self,
        session: Session,
        vm: Vm,
        *,
        exclude: str | None = None,
        pinned: str | None = None,
        lock: bool = True,
        pools: Callable[[str], bool] | None = None,
        candidates: list[Candidate] | None = None,
    ) -> Host:
        pool_allowed = pools or self._pool_filter(session, vm, self.policy.in_scope(session, vm.id))
        if candidates is None:
            # Host rows locked so two replicas placing at once cannot both take a host's last capacity.
            candidates = self.inventory.candidates(session, lock=lock)
        chosen = self._choose(vm, pool_allowed, candidates, pinned=pinned, exclude=exclude)
        return self.inventory.get(session, chosen.name)

    # -- requests ----------------------------------------------------------------------------------

    def _operation(self, session: Session, vm: Vm, kind: OperationKind, step: Step, **fields: Any) -> Operation:
        op = Operation(
            id=str(uuid.uuid4()), kind=kind, step=step, resource_id=vm.id, subscription=vm.subscription, **fields
        )
        session.add(op)
        session.add(Event(type=f"{kind.value}Accepted", subject=vm.id, data={"operation": op.id}))
        return op

    def put(self, session: Session, sub: str, rg: str, name: str, body: VmPut) -> tuple[Vm, Operation | None, bool]:
        """Create (judged, placed, rows written: ``(vm, operation, True)``) or update (``(vm, None, False)``).

        The create path is SQLAlchemy Core, and the host rows are locked last: everything that needs no
        lock (the name, the size, the policy and its assignments) is settled first, so the lock that
        serialises placements (``FOR UPDATE`` on PostgreSQL, the write lock on SQLite) is held only from
        the capacity read to the commit.
        """
        existing = self._existing(session, sub, rg, name)
        if existing is not None:
            return self._update_from_put(session, existing, body), None, False
        vm, op, _pool = self._create(session, sub, rg, name, body)
        return vm, op, True

    def _existing(self, session: Session, sub: str, rg: str, name: str) -> Vm | None:
        """The VM row, locked, if it exists (a cheap Core probe first: most PUTs create)."""
        check_name("virtualMachines", name)
        key = vm_id(sub, rg, name).lower()
        if session.connection().execute(_VM_EXISTS, {"id": key}).first() is None:
            return None
        return session.get(Vm, key, with_for_update=True)

    def _create(
        self, session: Session, sub: str, rg: str, name: str, body: VmPut
    ) -> tuple[Vm, Operation, tuple[str, str]]:
        """The VM and its Create operation written; with the group's name and the chosen host's pool."""
        rid = vm_id(sub, rg, name)
        key = rid.lower()
        conn = session.connection()
        try:
            sku = find_sku(body.properties.hardware_profile.vm_size)
        except UsageError as exc:
            raise InvalidRequest(str(exc)) from None
        group, rg_name = self._ensure_rg(session, sub, rg, body.location)
        props = body.properties
        now = time.time()
        vm = Vm(
            id=key,
            subscription=sub,
            resource_group=group,
            name=name,
            location=body.location,
            tags=dict(body.tags),
            vm_size=sku.name,
            vcpus=sku.vcpus,
            memory_gib=sku.memory // GIB,
            image=props.storage_profile.image_reference.id,
            cmdline=props.os_profile.cmdline,
            os_type=props.os_profile.os_type,
            clm=props.security_profile.confidential_live_migration,
            placement=props.placement.model_dump(by_alias=True, exclude_none=True, exclude={"host"}),
            provisioning_state=ProvisioningState.CREATING,
            power_state=PowerState.STARTING,
            host_vm_name=host_vm_name(rid, name),
            status_message="",
            created_at=now,
            updated_at=now,
        )
        assignments = self.policy.in_scope(session, vm.id)
        self.policy.judge(session, policy_doc(vm), assignments=assignments)
        pools = self._pool_filter(session, vm, assignments)
        candidates = self.inventory.candidates(session)  # unlocked: ranked here, re-checked under the lock
        pinned = props.placement.host
        if pinned is not None:
            # A pinned host is judged like a move's named destination: a deny names the assignment.
            found = next((c for c in candidates if c.name == pinned), None)
            if found is None:
                raise NotFound(f"host {pinned!r} is not registered")
            self.policy.judge(session, policy_doc(vm, host_pool=found.pool, host=pinned), assignments=assignments)
        demand = self._demand(vm, pinned=pinned)
        try:
            ranked = rank_hosts(candidates, demand, pools)
            # Last: one host row locked, its capacity counted after the lock, until the commit.
            chosen = self.inventory.lock_first(session, ranked, lambda c: rejects(c, demand, pools))
        except NoHost as exc:
            raise Conflict(str(exc)) from None
        vm.host = chosen.name
        # The pools the policy allows today are bound into the VM's migration policy: the agents enforce them.
        vm.allowed_pools = sorted({c.pool for c in candidates if pools(c.pool)}) or [chosen.pool]
        try:  # what the worker binds at launch: refused now, not failed on every try of the operation
            MigrationPolicy(allowed_pools=tuple(vm.allowed_pools))
        except ValidationError:
            raise Conflict(
                f"the policy allows {len(vm.allowed_pools)} host pools, more than a VM's migration policy binds:"
                " assign allowed-host-pools to name the pools it may use"
            ) from None
        vm.attestation = {"chipId": chosen.chip_id, "product": chosen.product}
        columns = {c.key: getattr(vm, c.key) for c in _VMS.columns}
        # Two creates of one name at once (PostgreSQL replicas): the second inserts nothing and is told so.
        inserted = conn.execute(_insert_ignore(conn, _VMS), columns).first()
        if inserted is None:
            raise Conflict(f"virtual machine {name!r} is being created by another request; try again")
        op = Operation(
            id=str(uuid.uuid4()), kind=OperationKind.CREATE, step=Step.PLACED, resource_id=vm.id,
            subscription=sub, host=chosen.name, target_host=None, migration_id=None, claimed_by=None,
            lease_until=0.0, attempts=0, error_code="", error_message="", created_at=now, updated_at=now,
        )  # fmt: skip
        conn.execute(_OP_INSERT, {c.key: getattr(op, c.key) for c in _OPS.columns})
        # The event through the session: the outbox inserts it at commit, in commit order.
        session.add(Event(type=f"{OperationKind.CREATE.value}Accepted", subject=vm.id, data={"operation": op.id}))
        return vm, op, (rg_name, chosen.pool)

    def put_view(
        self, session: Session, sub: str, rg: str, name: str, body: VmPut
    ) -> tuple[dict[str, Any], Operation | None]:
        """``put``, and the VM's resource as the response shows it (a create's from what it just wrote)."""
        existing = self._existing(session, sub, rg, name)
        if existing is not None:
            return self.resource(session, self._update_from_put(session, existing, body), eligibility=False), None
        vm, op, (rg_name, pool) = self._create(session, sub, rg, name, body)
        return self._view(vm, rg_name, pool, []), op

    @staticmethod
    def _demand(vm: Vm, *, pinned: str | None = None, exclude: str | None = None) -> Demand:
        return Demand(
            vcpus=vm.vcpus,
            memory_gib=vm.memory_gib,
            product=vm.placement.get("product"),
            minimum_tcb=vm.placement.get("minimumTcb"),
            pinned_host=pinned,
            exclude=exclude,
        )

    def _choose(
        self, vm: Vm, pools: Callable[[str], bool], candidates: list[Candidate], *, pinned: str | None = None,
        exclude: str | None = None,
    ) -> Candidate:  # fmt: skip
        try:
            return choose_host(candidates, self._demand(vm, pinned=pinned, exclude=exclude), pools)
        except NoHost as exc:
            raise Conflict(str(exc)) from None

    def _update_from_put(self, session: Session, vm: Vm, body: VmPut) -> Vm:
        props = body.properties
        fixed = {
            "hardwareProfile.vmSize": (find_sku(props.hardware_profile.vm_size).name, vm.vm_size),
            "storageProfile.imageReference.id": (props.storage_profile.image_reference.id, vm.image),
            "osProfile.cmdline": (props.os_profile.cmdline, vm.cmdline),
            "location": (body.location, vm.location),
        }
        changed = [k for k, (new, old) in fixed.items() if new != old]
        if changed:
            raise Conflict(f"{', '.join(changed)} cannot change on an existing VM (delete it and create it again)")
        return self._update(session, vm, props.security_profile.confidential_live_migration, dict(body.tags))

    def patch(self, session: Session, sub: str, rg: str, name: str, body: VmPatch) -> Vm:
        vm = self.get(session, sub, rg, name, lock=True)
        sec = body.properties.security_profile if body.properties else None
        clm = sec.confidential_live_migration if sec and sec.confidential_live_migration else vm.clm
        return self._update(session, vm, clm, body.tags if body.tags is not None else vm.tags)

    def _update(self, session: Session, vm: Vm, clm: ClmSetting, tags: dict[str, Any]) -> Vm:
        if vm.provisioning_state in _BUSY:
            raise Conflict(f"VM {vm.name!r} is {vm.provisioning_state.value}; try again when it settles")
        before = vm.clm
        vm.clm, vm.tags = clm, dict(tags)
        self.policy.judge(session, policy_doc(vm))
        vm.updated_at = time.time()
        if before is not clm:
            session.add(Event(type="VmConfidentialLiveMigrationChanged", subject=vm.id, data={"value": clm.value}))
        return vm

    def delete(self, session: Session, sub: str, rg: str, name: str) -> Operation | None:
        vm = self.get(session, sub, rg, name, lock=True)
        # Not while it is created or moved: its host-side instance may appear after the delete looked.
        if vm.provisioning_state in _BUSY:
            raise Conflict(f"VM {name!r} is {vm.provisioning_state.value}; try again when it settles")
        if vm.host is None:
            session.delete(vm)
            session.add(Event(type="VmDeleted", subject=vm.id, data={}))
            return None
        vm.provisioning_state = ProvisioningState.DELETING
        return self._operation(session, vm, OperationKind.DELETE, Step.ACCEPTED, host=vm.host)

    def migrate(self, session: Session, sub: str, rg: str, name: str, target: str | None) -> Operation:
        vm = self.get(session, sub, rg, name, lock=True)
        self.policy.judge(session, policy_doc(vm))  # a deny is a 403 naming the assignment, not a 409
        reasons = self.ineligible(session, vm, check_destination=False)
        if reasons:
            raise Conflict(f"VM {name!r} cannot be live-migrated: {'; '.join(reasons)}")
        if target is not None:
            host = self.inventory.get(session, target)
            # The named destination is judged like any placement; a deny names the assignment.
            self.policy.judge(session, policy_doc(vm, host_pool=host.pool, host=host.name))
        dest = self._place(session, vm, exclude=vm.host, pinned=target)
        if dest.pool not in vm.allowed_pools:
            raise Conflict(
                f"host {dest.name} is in pool {dest.pool!r}, outside the pools bound into the VM at launch"
                f" {vm.allowed_pools}: its migration agent would refuse it"
            )
        vm.provisioning_state = ProvisioningState.MIGRATING
        return self._operation(session, vm, OperationKind.MIGRATE, Step.ACCEPTED, host=vm.host, target_host=dest.name)

    def choose_destination(self, session: Session, vm: Vm, exclude: set[str]) -> Host:
        """A host for ``vm`` other than those in ``exclude``, inside both the policy's pools and the pools bound
        into the VM at launch (its migration agents refuse any other); cordoned hosts are never chosen.

        Raises:
            Conflict: no host passes every filter (the reasons name each host).
        """
        pools = self._pool_filter(session, vm, self.policy.in_scope(session, vm.id))
        bound = set(vm.allowed_pools)
        candidates = [c for c in self.inventory.candidates(session, lock=True) if c.name not in exclude]
        return self._place(session, vm, pools=lambda p: p in bound and pools(p), candidates=candidates)

    def start_move(self, session: Session, vm: Vm, dest: Host) -> Operation:
        """A Migrate operation of ``vm`` to ``dest`` (the worker carries it out), as an operator's move is."""
        vm.provisioning_state = ProvisioningState.MIGRATING
        return self._operation(session, vm, OperationKind.MIGRATE, Step.ACCEPTED, host=vm.host, target_host=dest.name)

    # -- views -------------------------------------------------------------------------------------

    def ineligible(self, session: Session, vm: Vm, *, check_destination: bool = True) -> list[str]:
        """Why the VM cannot be live-migrated now (empty: it can), like KubeVirt's LiveMigratable."""
        reasons = []
        if vm.clm is ClmSetting.DISABLED:
            reasons.append("ConfidentialLiveMigrationDisabled: the VM has not opted in")
        if vm.provisioning_state is not ProvisioningState.SUCCEEDED:
            reasons.append(f"NotSettled: provisioning state is {vm.provisioning_state.value}")
        if vm.power_state is not PowerState.RUNNING:
            reasons.append(f"NotRunning: power state is {vm.power_state.value}")
        host = session.get(Host, vm.host) if vm.host else None
        if host is None or host.state is not HostState.AVAILABLE:
            reasons.append(f"HostUnavailable: host {vm.host} is not available")
        try:
            self.policy.judge(session, policy_doc(vm), record=False)
        except RequestDisallowedByPolicy as exc:
            reasons.append(f"DisallowedByPolicy: assignment {exc.assignment.rsplit('/', 1)[-1]}")
        if check_destination and not reasons:
            try:
                self._place(session, vm, exclude=vm.host, lock=False)
            except Conflict as exc:
                reasons.append(f"NoDestination: {exc}")
        return reasons

    def resource(self, session: Session, vm: Vm, *, eligibility: bool = True) -> dict[str, Any]:
        host = session.get(Host, vm.host) if vm.host else None
        reasons = self.ineligible(session, vm) if eligibility else []
        group = session.get(ResourceGroup, vm.resource_group)
        rg = group.name if group is not None else vm.resource_group.rsplit("/", 1)[-1]
        return self._view(vm, rg, host.pool if host else None, reasons)

    @staticmethod
    def _view(vm: Vm, rg: str, host_pool: str | None, reasons: list[str]) -> dict[str, Any]:
        return {
            "id": vm_id(vm.subscription, rg, vm.name),
            "name": vm.name,
            "type": VM_TYPE,
            "location": vm.location,
            "tags": vm.tags,
            "properties": {
                "hardwareProfile": {"vmSize": vm.vm_size},
                "securityProfile": {"securityType": "ConfidentialVM", "confidentialLiveMigration": vm.clm.value},
                "storageProfile": {"imageReference": {"id": vm.image}},
                "osProfile": {"cmdline": vm.cmdline, "osType": vm.os_type},
                "provisioningState": vm.provisioning_state.value,
                "instanceView": {
                    "host": vm.host,
                    "hostPool": host_pool,
                    "hostVmName": vm.host_vm_name,
                    "powerState": vm.power_state.value,
                    "statusMessage": vm.status_message,
                    "attestation": vm.attestation,
                    "allowedHostPools": vm.allowed_pools,
                    "liveMigration": {"eligible": not reasons, "reasons": reasons},
                },
            },
        }
