"""control layer: the redeploy rung of a drain's ladder (HardwareRefresh when a live move is impossible).

The VM is stopped on its source, and the stop confirmed (deleted there, or 404), before it is started
fresh on another host that its policy and the pools bound into it at launch allow: never two copies,
never outside the allowed pools.  Each step commits before its host call::

    RedeployScheduled ─(NotBefore or approved)─▶ RedeployStopping ─(stop confirmed)─▶ RedeployStarting ─▶ Done

A source that cannot confirm the stop within the timeout leaves the VM where it is, reported Failed:
starting it elsewhere while its host may still run it could make two.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from cvmotion.agent.policy import MigrationPolicy
from cvmotion.control import scheduled_events as se
from cvmotion.control.db import Host, Vm
from cvmotion.control.db_maintenance import Drain, DrainVm
from cvmotion.control.drainstates import VmOutcome, VmStep
from cvmotion.control.ladder import attestation_facts, event, set_step
from cvmotion.control.resources import PowerState, ProvisioningState
from cvmotion.errors import Conflict, CvmError, NotFound

if TYPE_CHECKING:
    from cvmotion.control.drain_runner import DrainRunner

__all__ = ["Redeploy"]

_RUNNING = "running"
_VM_DEAD = ("stopped", "lost", "failed", "decommissioned")


class Redeploy:
    def __init__(self, runner: DrainRunner) -> None:
        self.r = runner
        self.opts = runner.options
        self.ladder = runner.ladder

    def scheduled(self, drain: Drain, row: DrainVm) -> None:
        if drain.cancel_requested:
            self.ladder.finish(drain, row, VmOutcome.BLOCKED, f"Canceled before the redeploy started ({row.reason})")
            return
        if not self.ladder.due(drain, row):
            return
        source = self.r.host_api(drain.host)
        before = attestation_facts(source.attestation(row.host_vm_name)) if source else {}
        now = self.r.clock()

        def body(session: Session, current: DrainVm, vm: Vm | None) -> None:
            if vm is None or vm.host != drain.host:
                set_step(current, VmStep.DONE, outcome=VmOutcome.SUCCEEDED, reason="the VM left the host meanwhile")
                return
            try:
                dest = self.r.vms.choose_destination(session, vm, {drain.host})
            except Conflict as exc:
                se.finish(session, current.vm_id, current.event_id)
                set_step(
                    current, VmStep.DONE, outcome=VmOutcome.BLOCKED, reason=f"{current.reason}; no redeploy: {exc}"
                )
                return
            se.start(session, vm.id, current.event_id or "")
            vm.provisioning_state = ProvisioningState.UPDATING
            set_step(
                current, VmStep.REDEPLOY_STOPPING, to_host=dest.name, attestation_before=before,
                deadline=now + self.opts.stop_timeout_s,
            )  # fmt: skip
            event(session, "cvmotion.maintenance.started", current, self.ladder.started_data(drain, current))

        self.ladder.update(drain, row, body)

    def stopping(self, drain: Drain, row: DrainVm) -> None:
        source = self.r.host_api(drain.host)
        try:
            if source is None:
                raise CvmError(f"host {drain.host} has no record")
            source.call("DELETE", f"/v1/vms/{row.host_vm_name}", timeout=60)
            self.r.fault("Drain:RedeployStopAnswered")
        except NotFound:
            pass  # already stopped: a predecessor's request got there
        except CvmError as exc:
            if self.r.clock() > (row.deadline or 0):
                self._unconfirmed_stop(drain, row, str(exc))
            return
        now = self.r.clock()

        def body(_s: Session, current: DrainVm, vm: Vm | None) -> None:
            if vm is not None:  # the destination's capacity is counted from here on
                vm.host, vm.power_state = current.to_host, PowerState.STARTING
                vm.provisioning_state, vm.updated_at = ProvisioningState.CREATING, now
            set_step(
                current, VmStep.REDEPLOY_STARTING, deadline=now + self.opts.boot_timeout_s,
                progress={"stoppedAt": now},
            )  # fmt: skip

        self.ladder.update(drain, row, body)

    def _unconfirmed_stop(self, drain: Drain, row: DrainVm, why: str) -> None:
        def body(session: Session, current: DrainVm, vm: Vm | None) -> None:
            if vm is not None:
                vm.provisioning_state, vm.power_state = ProvisioningState.SUCCEEDED, PowerState.UNKNOWN
                vm.status_message = f"redeploy stopped: its stop on {drain.host} is unconfirmed"
            se.finish(session, current.vm_id, current.event_id)
            reason = f"SourceUnavailable: the stop on {drain.host} is unconfirmed ({why[:300]}); not started elsewhere"
            set_step(current, VmStep.DONE, outcome=VmOutcome.FAILED, reason=reason)

        self.ladder.update(drain, row, body)

    def starting(self, drain: Drain, row: DrainVm) -> None:
        dest = self.r.host_api(row.to_host or "")
        vm = self.r.read(lambda s: s.get(Vm, row.vm_id))
        if dest is None or vm is None:
            self.ladder.finish(drain, row, VmOutcome.FAILED, "the VM or its new host record is gone")
            return
        try:
            found = dest.get_vm(row.host_vm_name)
            if found is None:
                doc = MigrationPolicy(allowed_pools=tuple(vm.allowed_pools)).canonical()
                body = {
                    "name": vm.host_vm_name, "image": vm.image, "size": vm.vm_size, "cmdline": vm.cmdline,
                    "migration_policy": base64.b64encode(doc).decode(),
                }  # fmt: skip
                try:
                    found = dest.call("POST", "/v1/vms", body, timeout=180)
                    self.r.fault("Drain:RedeployStartAnswered")
                except Conflict:
                    found = dest.get_vm(row.host_vm_name)
        except CvmError as exc:
            if self.r.clock() > (row.deadline or 0):
                self._start_failed(drain, row, str(exc))
            return
        state = str((found or {}).get("state", ""))
        if state in _VM_DEAD:
            self._start_failed(drain, row, f"the VM is {state} on {row.to_host}")
        elif state == _RUNNING:
            self._redeployed(drain, row, attestation_facts(dest.attestation(row.host_vm_name)))
        elif self.r.clock() > (row.deadline or 0):
            self._start_failed(drain, row, f"the VM did not start on {row.to_host} in time")

    def _start_failed(self, drain: Drain, row: DrainVm, why: str) -> None:
        def body(session: Session, current: DrainVm, vm: Vm | None) -> None:
            if vm is not None:
                vm.provisioning_state, vm.power_state, vm.host = ProvisioningState.FAILED, PowerState.STOPPED, None
                vm.status_message = f"redeploy failed: {why[:500]}"
            se.finish(session, current.vm_id, current.event_id)
            set_step(current, VmStep.DONE, outcome=VmOutcome.FAILED, reason=f"RedeployFailed: {why[:800]}")

        self.ladder.update(drain, row, body)

    def _redeployed(self, drain: Drain, row: DrainVm, after: dict[str, Any]) -> None:
        now = self.r.clock()

        def body(session: Session, current: DrainVm, vm: Vm | None) -> None:
            dest = session.get(Host, current.to_host or "")
            if vm is not None:
                vm.provisioning_state, vm.power_state, vm.updated_at = (
                    ProvisioningState.SUCCEEDED,
                    PowerState.RUNNING,
                    now,
                )
                vm.attestation = {"chipId": dest.chip_id if dest else None, "product": dest.product if dest else None}
                vm.attestation |= {k: v for k, v in after.items() if v is not None}
                vm.status_message = ""
            se.finish(session, current.vm_id, current.event_id, host=current.to_host)
            stopped = float(current.progress.get("stoppedAt", now))
            downtime = round((now - stopped) * 1000, 1)
            set_step(
                current, VmStep.DONE, outcome=VmOutcome.SUCCEEDED, downtime_ms=downtime, attestation_after=after,
                total_ms=round((now - (current.started_at or now)) * 1000, 1),
            )  # fmt: skip
            data = {
                "vm": current.name,
                "from": drain.host,
                "reason": current.reason,
                "method": "Redeploy",
                "pauseMs": None,
            }
            event(session, "cvmotion.maintenance.fallback", current, data)
            old = current.attestation_before
            event(
                session, "cvmotion.vm.postMigrationAttestation", current, {"vm": current.name, "old": old, "new": after}
            )

        self.ladder.update(drain, row, body)
