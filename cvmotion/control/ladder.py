"""control layer: one VM's way down a drain's ladder — live migration, then the fallbacks, one step per call.

``Ladder.advance`` looks at a VM's recorded step and does at most one thing: commits the next step
(before the host is asked anything), or asks a host and records its answer.  The drain runner calls it
every tick, so a VM whose turn has not come simply stays where it is, and a runner that dies between
any two of these is replaced by the next one from the last committed step:

- ``Pending``: decide.  Opted in, allowed and a destination free → Freeze scheduled (``LiveScheduled``)
  when a slot is free under the fleet's and the host's limits; otherwise the fallback of the drain's
  reason (``SecurityUpdate``: the in-place update; ``HardwareRefresh``: redeploy, or ``Blocked`` when no
  allowed host exists).
- ``LiveScheduled``: NotBefore passed or approved → a Migrate operation (the worker's machinery) to a
  destination chosen now; ``LiveMigrating`` records its id.
- ``LiveMigrating``: follow the operation (progress from the source's query-migrate; cancelled at the
  completion timeout); failed → one more destination, then the fallback; succeeded → the new attestation.
- ``Redeploy*``: stop on the source (confirmed), then start fresh on the chosen host: never two copies.
The in-place update acts on the whole host at once: ``control.in_place`` carries those steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cvmotion.control import scheduled_events as se
from cvmotion.control.db import Event, Host, Operation, Vm
from cvmotion.control.db_maintenance import Drain, DrainVm
from cvmotion.control.drainstates import NEXT_VM_STEPS, DrainMethod, DrainReason, VmOutcome, VmStep
from cvmotion.control.hostclient import HostApi
from cvmotion.control.operations import OperationKind, Step
from cvmotion.control.resources import ClmSetting, HostState, PowerState, ProvisioningState
from cvmotion.errors import Conflict, CvmError

if TYPE_CHECKING:
    from cvmotion.control.drain_runner import DrainRunner

__all__ = ["Ladder", "attestation_facts", "event", "set_step"]

_OPS_DONE = (Step.SUCCEEDED, Step.FAILED)
_MAX_LIVE_ATTEMPTS = 2  # the first destination and one retry to another
_RUNNING = "running"
_VM_DEAD = ("stopped", "lost", "failed", "decommissioned")


def attestation_facts(raw: dict[str, Any]) -> dict[str, Any]:
    """The event's ``{"chipId", "tcb", "tokenId", "platform"}`` from a host's ``/attestation`` answer."""
    return {
        "chipId": raw.get("chip_id"),
        "tcb": raw.get("tcb"),
        "tokenId": raw.get("jti"),
        "platform": raw.get("platform"),
    }


def set_step(row: DrainVm, step: VmStep, **fields: Any) -> None:
    if step not in NEXT_VM_STEPS[row.step]:
        raise ValueError(f"drained VM {row.name}: {row.step.value} -> {step.value} is not a ladder transition")
    row.step = step
    for key, value in fields.items():
        setattr(row, key, value)
    row.updated_at = time.time()
    if step is VmStep.DONE:
        row.ended_at = time.time()


def event(session: Session, kind: str, row: DrainVm, data: dict[str, Any]) -> None:
    session.add(Event(type=kind, subject=row.vm_id, data=data))


class Ladder:
    def __init__(self, runner: DrainRunner) -> None:
        self.r = runner
        self.opts = runner.options

    # -- dispatch ----------------------------------------------------------------------------------

    def advance(self, drain: Drain, row: DrainVm) -> None:
        handler: dict[VmStep, Callable[[Drain, DrainVm], None]] = {
            VmStep.PENDING: self._pending,
            VmStep.LIVE_SCHEDULED: self._live_scheduled,
            VmStep.LIVE_MIGRATING: self._live_migrating,
            VmStep.REDEPLOY_SCHEDULED: self.r.redeploy.scheduled,
            VmStep.REDEPLOY_STOPPING: self.r.redeploy.stopping,
            VmStep.REDEPLOY_STARTING: self.r.redeploy.starting,
        }
        if row.step in handler:
            handler[row.step](drain, row)

    def update(self, drain: Drain, row: DrainVm, body: Callable[[Session, DrainVm, Vm | None], None]) -> None:
        """Run ``body`` on the VM's ladder row and VM row, fenced by the drain's claim, if the step is unchanged."""
        expected = row.step

        def run(session: Session, _drain: Drain) -> VmStep:
            current = session.get(DrainVm, row.id, with_for_update=True)
            if current is None or current.step is not expected:
                return expected  # another tick of this claim already moved it
            body(session, current, session.get(Vm, row.vm_id, with_for_update=True))
            return current.step

        reached = self.r.txn(drain.id, run)
        if reached is not expected:
            self.r.fault(f"Drain:{reached.value}")  # the crash tests: killed right after the step committed

    def finish(self, drain: Drain, row: DrainVm, outcome: VmOutcome, reason: str, **fields: Any) -> None:
        def body(session: Session, current: DrainVm, _vm: Vm | None) -> None:
            se.finish(session, current.vm_id, current.event_id)
            set_step(current, VmStep.DONE, outcome=outcome, reason=reason[:1000], **fields)

        self.update(drain, row, body)

    # -- decide ------------------------------------------------------------------------------------

    def _live_blocker(self, session: Session, vm: Vm) -> str | None:
        """Why the VM cannot move live (None: it can, if a destination is free)."""
        if vm.clm is ClmSetting.DISABLED:
            return "ConfidentialLiveMigrationDisabled: the VM has not opted in to confidential live migration"
        reasons = self.r.vms.ineligible(session, vm, check_destination=False)
        if reasons:
            return "; ".join(reasons)
        return None

    def _slots_free(self, session: Session, drain: Drain) -> bool:
        """Under the fleet's limit and this host's outbound limit, counting scheduled moves as taken slots."""
        ops = select(func.count()).select_from(Operation)
        ops = ops.where(Operation.kind == OperationKind.MIGRATE, Operation.step.not_in(_OPS_DONE))
        held = select(func.count()).select_from(DrainVm).where(DrainVm.step == VmStep.LIVE_SCHEDULED)
        fleet = (session.scalar(ops) or 0) + (session.scalar(held) or 0)
        here = (session.scalar(ops.where(Operation.host == drain.host)) or 0) + (
            session.scalar(held.where(DrainVm.from_host == drain.host)) or 0
        )
        return fleet < self.opts.cluster_limit and here < drain.max_parallel

    def _pending(self, drain: Drain, row: DrainVm) -> None:
        now = self.r.clock()

        def body(session: Session, current: DrainVm, vm: Vm | None) -> None:
            if drain.cancel_requested:
                set_step(current, VmStep.DONE, outcome=VmOutcome.BLOCKED, reason="Canceled: the drain was canceled")
                return
            if vm is None:
                set_step(current, VmStep.DONE, outcome=VmOutcome.SUCCEEDED, reason="the VM was deleted meanwhile")
                return
            if vm.host != drain.host:
                set_step(current, VmStep.DONE, outcome=VmOutcome.SUCCEEDED, reason=f"the VM left for {vm.host}")
                return
            if vm.provisioning_state in (ProvisioningState.CREATING, ProvisioningState.MIGRATING):
                return  # settling (an operator's move, its creation): its turn comes after
            source = session.get(Host, drain.host)
            if source is None or source.state is not HostState.AVAILABLE:
                set_step(
                    current, VmStep.DONE, outcome=VmOutcome.FAILED,
                    reason=f"SourceUnavailable: host {drain.host} does not answer; the VM is left where it is"
                    " (never started elsewhere while its host may still run it)",
                )  # fmt: skip
                return
            if vm.power_state is not PowerState.RUNNING:
                set_step(current, VmStep.DONE, outcome=VmOutcome.FAILED, reason=f"the VM is {vm.power_state.value}")
                return
            blocker = self._live_blocker(session, vm)
            if blocker is None:
                try:
                    self.r.vms.choose_destination(session, vm, {drain.host})
                except Conflict as exc:
                    blocker = f"NoDestination: {exc}"
            if blocker is not None:
                self._fall_back(session, drain, current, vm, blocker, now)
                return
            if not self._slots_free(session, drain):
                return  # wait for a slot
            event_id = se.schedule(
                session, vm_id=vm.id, host=drain.host, host_vm_name=vm.host_vm_name, event_type="Freeze",
                not_before=now + drain.notice_s, duration_s=self.opts.freeze_live_s,
                description=f"Host {drain.reason.value}: the VM is live-migrated to another host",
            )  # fmt: skip
            set_step(
                current, VmStep.LIVE_SCHEDULED, method=DrainMethod.LIVE_MIGRATION, event_id=event_id,
                not_before=now + drain.notice_s, started_at=now,
            )  # fmt: skip
            self._scheduled_event(session, drain, current, "Freeze")

        self.update(drain, row, body)

    def _scheduled_event(self, session: Session, drain: Drain, row: DrainVm, event_type: str) -> None:
        data = {
            "vm": row.name, "host": drain.host, "drain": drain.id, "method": row.method.value,
            "eventId": row.event_id, "eventType": event_type, "notBefore": se.rfc1123(row.not_before or 0),
        }  # fmt: skip
        event(session, "cvmotion.maintenance.scheduled", row, data)

    def _fall_back(self, session: Session, drain: Drain, row: DrainVm, vm: Vm, why: str, now: float) -> None:
        """The next rung: in place (SecurityUpdate), redeploy or Blocked (HardwareRefresh)."""
        se.finish(session, row.vm_id, row.event_id)
        if drain.cancel_requested:
            set_step(row, VmStep.DONE, outcome=VmOutcome.BLOCKED, reason=f"Canceled after: {why}", event_id=None)
            return
        source = session.get(Host, drain.host)
        if source is None or source.state is not HostState.AVAILABLE:
            # Neither an update in place nor a stop can be asked of a host that does not answer, and starting
            # the VM elsewhere while its host may still run it could make two.
            reason = f"SourceUnavailable: host {drain.host} does not answer; the VM is left where it is ({why})"
            set_step(row, VmStep.DONE, outcome=VmOutcome.FAILED, reason=reason[:1000], event_id=None)
            return
        if drain.reason is DrainReason.SECURITY_UPDATE:
            set_step(
                row, VmStep.IN_PLACE_WAITING, method=DrainMethod.MEMORY_PRESERVING_UPDATE, reason=why, event_id=None
            )
            return
        try:
            self.r.vms.choose_destination(session, vm, {drain.host})
        except Conflict as exc:
            set_step(
                row, VmStep.DONE, outcome=VmOutcome.BLOCKED, method=DrainMethod.NONE, event_id=None,
                reason=f"{why}; no redeploy either, the VM's policy allows no other host: {exc}",
            )  # fmt: skip
            return
        event_id = se.schedule(
            session, vm_id=vm.id, host=drain.host, host_vm_name=vm.host_vm_name, event_type="Redeploy",
            not_before=now + drain.notice_s, duration_s=-1,
            description="Host HardwareRefresh: the VM is stopped and started fresh on another host",
        )  # fmt: skip
        set_step(
            row, VmStep.REDEPLOY_SCHEDULED, method=DrainMethod.REDEPLOY, reason=why, event_id=event_id,
            not_before=now + drain.notice_s, started_at=row.started_at or now,
        )  # fmt: skip
        self._scheduled_event(session, drain, row, "Redeploy")

    # -- live migration ----------------------------------------------------------------------------

    def due(self, drain: Drain, row: DrainVm) -> bool:
        """NotBefore passed, or the owner or the guest approved the event early."""
        if row.not_before is not None and self.r.clock() >= row.not_before:
            return True
        owner = self.r.read(lambda s: se.approved(s, row.vm_id, row.event_id))
        if owner:
            return True
        source = self.r.host_api(drain.host)
        if source is not None and row.event_id in se.guest_approvals(source, row.host_vm_name):

            def record(session: Session, _drain: Drain) -> None:
                se.approve(session, row.vm_id, [row.event_id or ""], "guest")

            self.r.txn(drain.id, record)
            return True
        return False

    def _live_scheduled(self, drain: Drain, row: DrainVm) -> None:
        if drain.cancel_requested:
            self.finish(drain, row, VmOutcome.BLOCKED, "Canceled: the drain was canceled before the move started")
            return
        if not self.due(drain, row):
            return
        source = self.r.host_api(drain.host)
        before = attestation_facts(source.attestation(row.host_vm_name)) if source else {}
        self._start_move(drain, row, before)

    def _start_move(self, drain: Drain, row: DrainVm, before: dict[str, Any] | None) -> None:
        now = self.r.clock()

        def body(session: Session, current: DrainVm, vm: Vm | None) -> None:
            if vm is None or vm.host != drain.host:
                set_step(current, VmStep.DONE, outcome=VmOutcome.SUCCEEDED, reason="the VM left the host meanwhile")
                return
            if vm.provisioning_state is not ProvisioningState.SUCCEEDED:
                return  # still settling a previous step: next tick
            blocker = self._live_blocker(session, vm)
            dest = None
            if blocker is None:
                try:
                    dest = self.r.vms.choose_destination(session, vm, {drain.host, *current.tried_hosts})
                except Conflict as exc:
                    blocker = f"NoDestination: {exc}"
            if dest is None:
                self._fall_back(session, drain, current, vm, blocker or "no destination", now)
                return
            op = self.r.vms.start_move(session, vm, dest)
            se.start(session, vm.id, current.event_id or "")
            fields: dict[str, Any] = {"attestation_before": before} if before is not None else {}
            set_step(
                current, VmStep.LIVE_MIGRATING, operation=op.id, to_host=dest.name, attempts=current.attempts + 1,
                deadline=now + self.opts.completion_timeout(current.memory_gib), progress={}, **fields,
            )  # fmt: skip
            if current.attempts == 1:
                event(session, "cvmotion.maintenance.started", current, self.started_data(drain, current))
            data = {"vm": current.name, "from": drain.host, "to": dest.name, "operation": op.id}
            event(session, "cvmotion.migration.started", current, data)

        self.update(drain, row, body)
        self.r.wake_workers()

    @staticmethod
    def started_data(drain: Drain, row: DrainVm) -> dict[str, Any]:
        return {"vm": row.name, "host": drain.host, "drain": drain.id, "method": row.method.value}

    def _live_migrating(self, drain: Drain, row: DrainVm) -> None:
        op = self.r.read(lambda s: s.get(Operation, row.operation or ""))
        if op is None:
            self.finish(drain, row, VmOutcome.FAILED, f"the Migrate operation {row.operation} is gone")
            return
        source = self.r.host_api(drain.host)
        if op.step is Step.SUCCEEDED:
            self._live_succeeded(drain, row, op)
        elif op.step is Step.FAILED:
            self._live_failed(drain, row, f"{op.error_code}: {op.error_message}")
        elif source is not None and op.migration_id:
            try:
                status = source.call("GET", f"/v1/migrations/{op.migration_id}", timeout=5)
            except CvmError:
                return
            self._progress(drain, row, status)
            if row.deadline is not None and self.r.clock() > row.deadline and status.get("status") == "active":
                # The completion timeout: the source cancels; the operation fails; the ladder goes on.
                try:
                    source.call("POST", f"/v1/migrations/{op.migration_id}/cancel", {}, timeout=5)
                except CvmError:
                    return

    def _progress(self, drain: Drain, row: DrainVm, status: dict[str, Any]) -> None:
        ram = status.get("ram", {})
        progress = {
            "status": status.get("status"),
            "round": ram.get("dirty-sync-count"),
            "remaining": ram.get("remaining"),
            "transferred": ram.get("transferred"),
            "mbps": ram.get("mbps"),
            "expectedDowntimeMs": status.get("expected-downtime"),
        }
        if progress == row.progress:
            return

        def body(_s: Session, current: DrainVm, _vm: Vm | None) -> None:
            current.progress = progress

        self.update(drain, row, body)

    def _live_failed(self, drain: Drain, row: DrainVm, why: str) -> None:
        now = self.r.clock()

        def body(session: Session, current: DrainVm, vm: Vm | None) -> None:
            data = {"vm": current.name, "from": drain.host, "to": current.to_host, "reason": why[:500]}
            event(session, "cvmotion.migration.failed", current, data)
            current.tried_hosts = [*current.tried_hosts, current.to_host]
            if vm is None:
                set_step(current, VmStep.DONE, outcome=VmOutcome.FAILED, reason=f"the VM is gone after: {why}")
                return
            retry = current.attempts < _MAX_LIVE_ATTEMPTS and not drain.cancel_requested
            dest = None
            if retry and vm.host == drain.host and vm.provisioning_state is ProvisioningState.SUCCEEDED:
                try:
                    dest = self.r.vms.choose_destination(session, vm, {drain.host, *current.tried_hosts})
                except Conflict:
                    dest = None
            if dest is None:
                self._fall_back(session, drain, current, vm, f"LiveMigrationFailed: {why}", now)
                return
            op = self.r.vms.start_move(session, vm, dest)
            set_step(
                current, VmStep.LIVE_MIGRATING, operation=op.id, to_host=dest.name, attempts=current.attempts + 1,
                deadline=now + self.opts.completion_timeout(current.memory_gib), progress={},
            )  # fmt: skip
            data = {"vm": current.name, "from": drain.host, "to": dest.name, "operation": op.id}
            event(session, "cvmotion.migration.started", current, data)

        self.update(drain, row, body)
        self.r.wake_workers()

    @staticmethod
    def _migration_stats(source: HostApi, migration_id: str | None, name: str) -> dict[str, Any]:
        """The source's query-migrate of the move; by the VM's name when the operation adopted an arrival
        without recording the id (a successor that found the VM already running on its destination)."""
        if migration_id:
            found: dict[str, Any] = source.call("GET", f"/v1/migrations/{migration_id}", timeout=10)
            return found
        done = [
            m for m in source.call("GET", "/v1/migrations", timeout=10)["migrations"]
            if m.get("x-cvmotion", {}).get("vm") == name and m.get("status") == "completed"
        ]  # fmt: skip
        return done[-1] if done else {}

    def _live_succeeded(self, drain: Drain, row: DrainVm, op: Operation) -> None:
        dest_api = self.r.host_api(row.to_host or "")
        after = attestation_facts(dest_api.attestation(row.host_vm_name)) if dest_api else {}
        fresh = after.get("tokenId") and after.get("tokenId") != row.attestation_before.get("tokenId")
        waiting = self.r.clock() < op.updated_at + self.opts.attest_wait_s
        if not fresh and waiting:
            return  # the paravisor re-attests after resume: wait for its new token (bounded)
        source = self.r.host_api(drain.host)
        try:
            stats = self._migration_stats(source, op.migration_id, row.host_vm_name) if source else {}
        except CvmError:
            if waiting:
                return  # the source is slow to answer: its figures are asked again (bounded)
            stats = {}
        x = stats.get("x-cvmotion", {})
        total, downtime = x.get("total-time-ms", stats.get("total-time")), x.get("downtime-ms", stats.get("downtime"))
        sent = stats.get("ram", {}).get("transferred")

        def body(session: Session, current: DrainVm, vm: Vm | None) -> None:
            se.finish(session, current.vm_id, current.event_id, host=current.to_host)
            if vm is not None and after.get("tokenId"):
                vm.attestation = {**vm.attestation, **{k: v for k, v in after.items() if v is not None}}
            set_step(
                current, VmStep.DONE, outcome=VmOutcome.SUCCEEDED, total_ms=total, downtime_ms=downtime, bytes=sent,
                attestation_after=after, progress=current.progress | {"status": "completed", "remaining": 0},
            )  # fmt: skip
            data = {
                "vm": current.name, "from": drain.host, "to": current.to_host, "totalMs": total,
                "downtimeMs": downtime, "bytes": sent, "operation": current.operation,
            }  # fmt: skip
            event(session, "cvmotion.migration.completed", current, data)
            old = current.attestation_before
            event(
                session, "cvmotion.vm.postMigrationAttestation", current, {"vm": current.name, "old": old, "new": after}
            )

        self.update(drain, row, body)
