"""control layer: the operation worker — claims operations and carries them out against host APIs.

Claims are leases: ``SELECT … FOR UPDATE SKIP LOCKED`` (PostgreSQL; SQLite's ``BEGIN IMMEDIATE``
serialises instead) picks an unfinished operation nobody holds or whose holder's lease ran out, and
stamps it with this worker's id.  Each step commits before the host is asked anything, and every write
checks the claim is still ours (a worker that lost its lease stops: fencing).  Host calls are
idempotent by the VM's host-side name: a successor first asks the host what it already did.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from cvmotion.agent.policy import MigrationPolicy
from cvmotion.control.db import Event, Host, Operation, Vm
from cvmotion.control.errors import HostBusy, HostUnreachable
from cvmotion.control.hostclient import HostApi
from cvmotion.control.operations import NEXT_STEPS, OperationKind, Step
from cvmotion.control.resources import PowerState, ProvisioningState
from cvmotion.errors import Conflict, CvmError, NotFound, UsageError

__all__ = ["LostClaim", "Worker"]

log = logging.getLogger("cvmotion.control.worker")
_DONE = (Step.SUCCEEDED, Step.FAILED)
_MAX_ATTEMPTS = 8
_RUNNING = "running"
_VM_DEAD = ("stopped", "lost", "failed", "decommissioned")
_BOOT_TIMEOUT = 120.0
_MAX_BACKOFF_S = 8.0  # a worker retries a database that is away at least this often
# Fault injection for the crash tests: the file this names holds a point such as "Create:HostRequested"
# (the step is durable, the host not asked yet) or "Migrate:HostAnswered" (the host acted, the controller
# has not recorded it); at that point the process removes the file and SIGKILLs itself.  Unset in production.
_KILL_FILE = os.environ.get("CVMOTION_FAULT_KILL_FILE")
PARALLEL_MIGRATIONS = 5  # live migrations in flight fleet-wide (KubeVirt's parallelMigrationsPerCluster default)
_MIGRATION_SLOTS_LOCK = 0x63766D6D  # pg_advisory_xact_lock key of the claim of a migration ("cvmm")
_UNSTARTED_MIGRATION = and_(Operation.kind == OperationKind.MIGRATE, Operation.step == Step.ACCEPTED)
_STARTED_MIGRATION = and_(
    Operation.kind == OperationKind.MIGRATE, Operation.step.in_((Step.HOST_REQUESTED, Step.MIGRATING))
)
# A started migration whose source has not answered for this long gives its fleet slot back (it moves no data
# anyone can see; a failed host's moves would otherwise hold the slots for its whole outage) and takes one
# again when its source answers.  Its operation stays open: only the source can say how the move ended.
SILENT_SOURCE_GRACE_S = 10.0
_SILENT_RETRY_S = (1.0, 15.0)  # a silent source is asked again after a quarter of its silence, within these
_LONG_POLL_S = 2.0  # each status request waits this long on the source for the migration to settle


def _fault(point: str) -> None:
    if not _KILL_FILE:
        return
    try:
        armed = open(_KILL_FILE).read().strip()  # noqa: SIM115 - a one-shot read on a test-only path
    except OSError:
        return
    if armed == point:
        os.unlink(_KILL_FILE)
        os.kill(os.getpid(), signal.SIGKILL)


class LostClaim(Exception):
    """Another worker holds the operation now; this one must stop touching it."""


class _Failed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Worker:
    def __init__(
        self,
        engine: Engine,
        worker_id: str,
        *,
        lease: float = 5.0,
        poll: float = 0.5,
        write_lock: threading.Lock | None = None,
        reader: Engine | None = None,
        parallel_migrations: int = PARALLEL_MIGRATIONS,
        silent_source_grace: float = SILENT_SOURCE_GRACE_S,
    ) -> None:
        if parallel_migrations < 1:
            raise ValueError(f"parallel_migrations must be at least 1, not {parallel_migrations}")
        self.engine = engine
        self.parallel_migrations = parallel_migrations
        self.silent_source_grace = silent_source_grace
        self.reader = reader or engine
        self.write_lock = write_lock
        self.id = worker_id
        self.lease = lease
        self.poll = poll
        self.wake = threading.Event()

    # -- claims ------------------------------------------------------------------------------------

    def claim(self) -> str | None:
        claimed = self.claim_op()
        return None if claimed is None else claimed[0]

    def claim_op(self) -> tuple[str, OperationKind, Step] | None:
        """Claim an operation: its id, kind and step as claimed (so executing it needs no second read)."""
        now = time.time()
        claimable = (
            Operation.step.not_in(_DONE),
            or_(Operation.claimed_by.is_(None), Operation.lease_until < now),
            or_(~_UNSTARTED_MIGRATION, self._migration_slots(now) > 0),
        )
        with Session(self.reader) as session:
            # A plain read first: idle workers do not queue for the write lock.
            if session.scalars(select(Operation.id).where(*claimable).limit(1)).first() is None:
                session.rollback()
                return None
        with self._locked(), Session(self.engine) as session, session.begin():
            query = (
                select(Operation)
                .where(*claimable)
                .order_by(Operation.lease_until, Operation.created_at)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            op = session.scalars(query).first()
            if op is None:
                return None
            step = op.step
            if op.kind is OperationKind.MIGRATE and step is Step.ACCEPTED:
                if not self._slot_still_free(session, now):
                    return None  # another replica took the last slot meanwhile
                # Started in the claim's own transaction: the slot is taken the moment the claim commits.
                self._advance(session, op, Step.HOST_REQUESTED)
            op.claimed_by, op.lease_until, op.attempts = self.id, now + self.lease, op.attempts + 1
            return op.id, op.kind, step

    def _migration_slots(self, now: float) -> Any:
        """Free slots under the fleet's limit of live migrations in flight (KubeVirt's
        ``parallelMigrationsPerCluster``): a migration is in flight from the moment it is started
        (``HostRequested``) until it settles, whoever holds it and whether or not its holder is alive (its
        host may still be moving the VM) — unless its source has not answered for ``silent_source_grace``."""
        answering = or_(
            Operation.source_silent_since.is_(None), Operation.source_silent_since > now - self.silent_source_grace
        )
        in_flight = select(func.count()).select_from(Operation).where(_STARTED_MIGRATION, answering)
        return self.parallel_migrations - in_flight.scalar_subquery()

    def _slot_still_free(self, session: Session, now: float) -> bool:
        """The count again, under a lock every replica's claim of a migration takes (PostgreSQL): ``SKIP
        LOCKED`` lets two replicas each see the last free slot.  SQLite's writers are serialised already."""
        if session.get_bind().dialect.name == "postgresql":
            session.execute(select(func.pg_advisory_xact_lock(_MIGRATION_SLOTS_LOCK)))
        return (session.scalar(select(self._migration_slots(now))) or 0) > 0

    def _locked(self) -> contextlib.AbstractContextManager[Any]:
        return self.write_lock if self.write_lock is not None else contextlib.nullcontext()

    def _txn(self, op_id: str, body: Callable[[Session, Operation], Any]) -> Any:
        """Run ``body`` in a transaction after checking the claim is still ours; renews the lease."""
        with self._locked(), Session(self.engine, expire_on_commit=False) as session, session.begin():
            op = session.get(Operation, op_id, with_for_update=True)
            if op is None or op.claimed_by != self.id:
                raise LostClaim(op_id)
            op.lease_until = time.time() + self.lease
            op.updated_at = time.time()
            result = body(session, op)
            point = f"{op.kind.value}:{op.step.value}"
        _fault(point)
        return result

    def _keep_claim(self, op_id: str, renewed: float) -> float:
        """Renew the claim (a write transaction that also checks it is still ours: ``LostClaim`` otherwise)
        once a third of the lease has passed since ``renewed`` (monotonic); when it was last renewed.

        Not on every poll: a write per 0.1 s poll per operation in flight was most of the controller's
        commits in a wave, and SQLite serialises them with every other write."""
        now = time.monotonic()
        if now - renewed < self.lease / 3:
            return renewed
        self._txn(op_id, lambda _s, _op: None)
        return now

    @contextlib.contextmanager
    def _leased(self, op_id: str) -> Iterator[None]:
        """Keep renewing the claim while this worker carries the operation out: a host call can outlast the
        lease (a destination that stopped answering takes its whole timeout), and without this another worker
        takes the operation over, this one's answer — even a refusal — is thrown away, round after round, and
        the operation never settles.  The renewals stop when this process dies: then the lease runs out."""
        done = threading.Event()

        def renew() -> None:
            while not done.wait(self.lease / 3):
                try:
                    with self._locked(), Session(self.engine) as session, session.begin():
                        op = session.get(Operation, op_id, with_for_update=True)
                        if op is None or op.claimed_by != self.id:
                            return
                        op.lease_until = time.time() + self.lease
                except Exception:
                    log.warning("operation %s: renewing its lease failed; retrying", op_id, exc_info=True)

        keeper = threading.Thread(target=renew, name=f"lease-{op_id[:8]}", daemon=True)
        keeper.start()
        try:
            yield
        finally:
            done.set()
            keeper.join(5)

    def _advance(self, session: Session, op: Operation, step: Step, **fields: Any) -> None:
        allowed = NEXT_STEPS[op.kind].get(op.step, frozenset())
        if step not in allowed:
            raise ValueError(f"operation {op.id}: {op.step.value} -> {step.value} is not a transition of {op.kind}")
        op.step = step
        for key, value in fields.items():
            setattr(op, key, value)
        if step in _DONE:
            op.claimed_by = None
        session.add(Event(type=f"Operation{step.value}", subject=op.resource_id, data={"operation": op.id}))

    def run(self, stop: threading.Event) -> None:
        failures = 0  # in a row: the wait doubles (database down), back to the poll after a success
        while not stop.is_set():
            try:
                claimed = self.claim_op()
            except Exception as exc:
                failures += 1
                delay = self._backoff(failures)
                if failures == 1 or not isinstance(exc, DBAPIError):
                    log.exception("claiming an operation failed (database unavailable?); retrying in %.1f s", delay)
                else:
                    log.warning("claiming an operation failed again (%d); retrying in %.1f s", failures, delay)
                stop.wait(delay)
                continue
            failures = 0
            if claimed is None:
                self.wake.wait(self.poll)
                self.wake.clear()
                continue
            op_id = claimed[0]
            try:
                self.execute(op_id, claimed[1:])
            except LostClaim:
                log.warning("operation %s: claim lost to another worker", op_id)
            except Exception:
                failures += 1
                log.exception("operation %s: step failed; it stays claimable after the lease", op_id)
                stop.wait(self._backoff(failures))

    def _backoff(self, failures: int) -> float:
        return min(self.poll * 2.0 ** (failures - 1), _MAX_BACKOFF_S)

    # -- execution ---------------------------------------------------------------------------------

    def execute(self, op_id: str, claimed: tuple[OperationKind, Step] | None = None) -> None:
        """Carry the operation out from its step (``claimed``: kind and step as the claim read them)."""
        with self._leased(op_id):
            self._execute(op_id, claimed)

    def _execute(self, op_id: str, claimed: tuple[OperationKind, Step] | None) -> None:
        kind, step = claimed or self._txn(op_id, lambda _s, op: (op.kind, op.step))
        try:
            if kind is OperationKind.CREATE:
                self._create(op_id, step)
            elif kind is OperationKind.DELETE:
                self._delete(op_id)
            else:
                self._migrate(op_id, step)
        except _Failed as failed:
            code, message = failed.code, str(failed)
            self._txn(op_id, lambda s, op: self._fail(s, op, code, message))
        except HostUnreachable as unreachable:
            text = str(unreachable)
            self._txn(op_id, lambda s, op: self._retry_or_fail(s, op, text))

    def _retry_or_fail(self, session: Session, op: Operation, message: str) -> None:
        if op.attempts >= _MAX_ATTEMPTS:
            self._fail(session, op, "HostUnreachable", message)
            return
        if op.kind is OperationKind.MIGRATE and op.source_silent_since is None:
            op.source_silent_since = time.time()  # only a move's source is asked before it is Migrating
        op.error_message = message
        op.claimed_by = None
        op.lease_until = time.time() + min(0.2 * 2**op.attempts, 10.0)  # backoff before the next claim

    def _fail(self, session: Session, op: Operation, code: str, message: str) -> None:
        vm = session.get(Vm, op.resource_id)
        if vm is not None:
            if op.kind is OperationKind.CREATE:
                vm.provisioning_state, vm.power_state = ProvisioningState.FAILED, PowerState.STOPPED
                if code != "HostUnreachable":
                    vm.host = None  # the host refused it: nothing runs there, its capacity is free again
            else:
                vm.provisioning_state = ProvisioningState.SUCCEEDED  # the VM stays where its host runs it
            vm.status_message = message[:1000]
        self._advance(session, op, Step.FAILED, error_code=code, error_message=message[:2000])

    def _context(self, op_id: str, host_field: str = "host", *, advance: Step | None = None) -> tuple[Vm, Host]:
        """The VM and the host the operation acts on (detached copies); ``advance``: its next step first,
        in the same transaction."""

        def read(session: Session, op: Operation) -> tuple[Vm, Host]:
            if advance is not None:
                self._advance(session, op, advance)
            vm = session.get(Vm, op.resource_id)
            host = session.get(Host, getattr(op, host_field) or "")
            if vm is None or host is None:
                raise _Failed("Gone", f"the VM or its host record is gone ({op.resource_id})")
            session.expunge(vm)
            session.expunge(host)
            return vm, host

        result: tuple[Vm, Host] = self._txn(op_id, read)
        return result

    def _create(self, op_id: str, step: Step) -> None:
        first = step is Step.PLACED
        # HostRequested commits before the host is asked (with the read of what to ask, one transaction).
        vm, host = self._context(op_id, advance=Step.HOST_REQUESTED if first else None)
        api = HostApi(host.api_url)
        # From Placed nobody has asked the host yet, so there is nothing to look for; from HostRequested a
        # predecessor may have: ask the host what it has first.
        found = None if first else api.get_vm(vm.host_vm_name)
        if found is None:
            doc = MigrationPolicy(allowed_pools=tuple(vm.allowed_pools)).canonical()
            body = {
                "name": vm.host_vm_name,
                "image": vm.image,
                "size": vm.vm_size,
                "cmdline": vm.cmdline,
                "migration_policy": base64.b64encode(doc).decode(),
            }
            try:
                found = api.call("POST", "/v1/vms", body, timeout=180)
            except Conflict:
                found = api.get_vm(vm.host_vm_name)  # a predecessor's request got there first
            except HostUnreachable:
                raise
            except CvmError as exc:
                raise _Failed("HostRefused", str(exc)) from None
        _fault("Create:HostAnswered")
        state = self._await_running(op_id, api, vm.host_vm_name, found)
        if state != _RUNNING:
            raise _Failed("VmFailed", f"the VM is {state or 'missing'} on host {host.name}")

        def done(session: Session, op: Operation) -> None:
            row = session.get(Vm, op.resource_id)
            if row is not None:
                row.provisioning_state = ProvisioningState.SUCCEEDED
                row.power_state = PowerState.RUNNING
                row.status_message = ""
                row.updated_at = time.time()
                session.add(Event(type="VmCreated", subject=row.id, data={"host": host.name}))
            self._advance(session, op, Step.SUCCEEDED)

        self._txn(op_id, done)

    def _await_running(self, op_id: str, api: HostApi, name: str, found: dict[str, Any] | None) -> str:
        """Poll the host (bounded, renewing the lease) until the VM runs or is dead; its last state."""
        deadline = time.monotonic() + _BOOT_TIMEOUT
        state = str((found or {}).get("state", ""))
        renewed = time.monotonic()
        while found is not None and state not in (_RUNNING, *_VM_DEAD) and time.monotonic() < deadline:
            renewed = self._keep_claim(op_id, renewed)
            time.sleep(0.05)
            found = api.get_vm(name)
            state = str((found or {}).get("state", ""))
        return state

    def _delete(self, op_id: str) -> None:
        def requested(session: Session, op: Operation) -> None:
            if op.step is Step.ACCEPTED:
                self._advance(session, op, Step.HOST_REQUESTED)

        self._txn(op_id, requested)
        vm, host = self._context(op_id)
        try:
            HostApi(host.api_url).call("DELETE", f"/v1/vms/{vm.host_vm_name}", timeout=60)
        except NotFound:
            pass  # already gone: a predecessor deleted it, or it never started
        except (HostUnreachable, _Failed):
            raise
        except CvmError as exc:
            raise _Failed("HostRefused", str(exc)) from None
        _fault("Delete:HostAnswered")

        def done(session: Session, op: Operation) -> None:
            row = session.get(Vm, op.resource_id)
            if row is not None:
                session.delete(row)
                session.add(Event(type="VmDeleted", subject=op.resource_id, data={"host": host.name}))
            self._advance(session, op, Step.SUCCEEDED)

        self._txn(op_id, done)

    def _migrate(self, op_id: str, step: Step) -> None:
        # ``Accepted`` as claimed: this claim started it (or, called without a claim, starts it now), so nobody
        # has asked the source yet and there is nothing to look for first.
        fresh = step is Step.ACCEPTED

        def read(session: Session, op: Operation) -> tuple[Vm, Host, Host, str | None, bool]:
            if op.step is Step.ACCEPTED:
                self._advance(session, op, Step.HOST_REQUESTED)
            vm = session.get(Vm, op.resource_id)
            source, dest = session.get(Host, op.host or ""), session.get(Host, op.target_host or "")
            if vm is None or source is None or dest is None:
                raise _Failed("Gone", f"the VM or a host record is gone ({op.resource_id})")
            for row in (vm, source, dest):
                session.expunge(row)
            return vm, source, dest, op.migration_id, op.source_silent_since is not None

        # One transaction reads all the move needs (it ran as four: each a write, queued behind every other).
        vm, source, dest, mig_id, silent = self._txn(op_id, read)
        src_api, dst_api = HostApi(source.api_url), HostApi(dest.api_url)
        if mig_id is None:
            if not fresh:
                arrived = dst_api.get_vm(vm.host_vm_name)
                if arrived is not None and arrived.get("state") == _RUNNING:
                    # A predecessor's move finished before it recorded the id: the source keeps finished
                    # migrations, so the figures are fetched from its record, not lost.
                    record = self._finished_record(src_api, vm.host_vm_name)
                    self._finish_migration(op_id, dest, record)
                    return
                mig_id = self._find_migration(src_api, vm.host_vm_name)
            if mig_id is None:
                try:
                    started = src_api.call(
                        "POST", f"/v1/vms/{vm.host_vm_name}/migrate", {"destination": dest.api_url}, timeout=120
                    )
                except (HostUnreachable, _Failed):
                    raise
                except Conflict as exc:
                    raise HostBusy(str(exc)) from None  # e.g. a failed move still releasing the VM
                except CvmError as exc:
                    raise _Failed("MigrationRefused", str(exc)) from None
                mig_id = str(started["migration"])
                _fault("Migrate:HostAnswered")
            recorded = mig_id
            migrating = {"migration_id": recorded, "source_silent_since": None}
            self._txn(op_id, lambda s, op: self._advance(s, op, Step.MIGRATING, **migrating))
            silent = False
        self._await_migration(op_id, src_api, dst_api, vm, dest, mig_id, silent)

    @staticmethod
    def _finished_record(api: HostApi, name: str) -> dict[str, Any] | None:
        """The source's record of the completed migration of ``name`` (the newest), or ``None`` when the
        source does not answer or no longer knows it (restarted): the move stands, without its figures."""
        try:
            listed = api.call("GET", "/v1/migrations", timeout=10)["migrations"]
            done = [m for m in listed if m["x-cvmotion"]["vm"] == name and m["status"] == "completed"]
            if not done:
                return None
            record = api.call("GET", f"/v1/migrations/{done[-1]['x-cvmotion']['id']}", timeout=10)
        except (CvmError, KeyError, TypeError) as exc:
            log.warning("the finished migration of %s: no record from its source (%s)", name, exc)
            return None
        return record if isinstance(record, dict) else None

    @staticmethod
    def _find_migration(api: HostApi, name: str) -> str | None:
        for mig in api.call("GET", "/v1/migrations")["migrations"]:
            if mig["x-cvmotion"]["vm"] == name and mig["status"] not in ("failed", "cancelled"):
                return str(mig["x-cvmotion"]["id"])
        return None

    def _await_migration(
        self, op_id: str, src: HostApi, dst: HostApi, vm: Vm, dest: Host, mig_id: str, silent: bool
    ) -> None:
        renewed = time.monotonic()
        while True:
            asked = time.monotonic()
            try:
                # A long-poll: the source answers when the move settles (or after _LONG_POLL_S), so its end is
                # seen within milliseconds and one request stands for what was 20 polls.
                status = src.migration(mig_id, wait=min(_LONG_POLL_S, self.lease / 3))
            except NotFound:
                # The source restarted and forgot the id: the destination says whether the VM arrived (a
                # destination that does not answer either fails the step, retried: it may hold the VM).
                arrived = dst.get_vm(vm.host_vm_name)
                if arrived is not None and arrived.get("state") == _RUNNING:
                    self._finish_migration(op_id, dest, None)
                    return
                lost = f"migration {mig_id} is unknown to the source and the VM did not arrive"
                raise _Failed("MigrationLost", lost) from None
            except (Conflict, UsageError):
                raise  # an answer, if not the one expected: retried after the lease as any failed step
            except CvmError as exc:  # the source does not answer (unreachable, 5xx)
                if self._arrived(dst, vm):
                    self._finish_migration(op_id, dest, None)  # committed before its source went away
                else:
                    self._txn(op_id, functools.partial(self._source_silent, message=str(exc)))
                return
            if silent:
                self._txn(op_id, lambda _s, op: setattr(op, "source_silent_since", None))  # it answers: a slot again
                silent = False
            if status["status"] == "completed":
                self._finish_migration(op_id, dest, status)
                return
            if status["status"] in ("failed", "cancelled"):
                raise _Failed("MigrationFailed", str(status.get("error-desc") or status["status"]))
            renewed = self._keep_claim(op_id, renewed)  # the host works: hold the claim
            # A host that does not long-poll answers at once: poll it every 0.1 s as before.
            time.sleep(max(0.0, 0.1 - (time.monotonic() - asked)))

    @staticmethod
    def _arrived(dst: HostApi, vm: Vm) -> bool:
        try:
            arrived = dst.get_vm(vm.host_vm_name)
        except CvmError:
            return False
        return arrived is not None and arrived.get("state") == _RUNNING

    def _source_silent(self, _session: Session, op: Operation, *, message: str) -> None:
        """The move's source did not answer: note since when (its slot is given back past the grace) and let
        the operation go, to be asked again by whichever worker is free then (sooner early in the silence)."""
        now = time.time()
        if op.source_silent_since is None:
            op.source_silent_since = now
            log.warning("operation %s: the source of migration %s does not answer: %s", op.id, op.migration_id, message)
        low, high = _SILENT_RETRY_S
        op.error_message = message[:2000]
        op.claimed_by, op.lease_until = None, now + min(high, max(low, (now - op.source_silent_since) / 4))

    def _finish_migration(self, op_id: str, dest: Host, stats: dict[str, Any] | None) -> None:
        """The VM is on ``dest``: record it, with the migration's figures (``stats``: the source's record)."""
        cvm = (stats or {}).get("x-cvmotion")
        found = cvm.get("id") if isinstance(cvm, dict) else None

        def done(session: Session, op: Operation) -> None:
            if op.migration_id is None and found:
                op.migration_id = str(found)  # found on the source after the fact: the operation names it
            row = session.get(Vm, op.resource_id)
            if row is not None:
                row.host = dest.name
                row.provisioning_state = ProvisioningState.SUCCEEDED
                row.power_state = PowerState.RUNNING
                row.attestation = {"chipId": dest.chip_id, "product": dest.product}
                row.updated_at = time.time()
                data: dict[str, Any] = {"from": op.host, "to": dest.name, "migration": op.migration_id}
                if stats is not None:
                    total, downtime = stats.get("total-time"), stats.get("downtime")
                    ram = stats.get("ram")
                    data |= {
                        "total-time": total, "downtime": downtime, "totalMs": total, "downtimeMs": downtime,
                        "bytes": ram.get("transferred") if isinstance(ram, dict) else None,
                    }  # fmt: skip
                session.add(Event(type="VmMigrated", subject=row.id, data=data))
            self._advance(session, op, Step.SUCCEEDED)

        self._txn(op_id, done)


def reset_claims(engine: Engine) -> None:
    """Free every claim: only for a database this process owns alone (SQLite under the leader lock)."""
    with Session(engine) as session, session.begin():
        session.execute(update(Operation).where(Operation.step.not_in(_DONE)).values(claimed_by=None, lease_until=0.0))
