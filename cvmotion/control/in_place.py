"""control layer: a drain's memory-preserving update in place — the whole host at once, once its live moves settled.

The VMs that stay (not opted in, forbidden, no destination, or their live move failed) wait in
``InPlaceWaiting`` until no VM of the drain is still deciding or moving live; then each gets a ``Freeze``
event (``InPlaceScheduled``); once every one is due (NotBefore passed or approved) the step
``InPlaceRunning`` commits with the host's maintenance id (``mpu-<drain id>``, so a successor asks the same
one again: the host answers the same record) and only then ``POST /v1/host/maintenance`` is sent.  The
host pauses every VM, restarts its daemon and platform process, resumes and re-attests them; while its
daemon restarts the port refuses connections, which counts as "still in progress" until the timeout.
Each VM's outcome and pause come from the host's record.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cvmotion.control import scheduled_events as se
from cvmotion.control.db import Event, Vm
from cvmotion.control.db_maintenance import Drain, DrainVm
from cvmotion.control.drainstates import VmOutcome, VmStep
from cvmotion.control.errors import HostUnreachable
from cvmotion.control.ladder import attestation_facts, set_step
from cvmotion.errors import Conflict, CvmError, NotFound

if TYPE_CHECKING:
    from cvmotion.control.drain_runner import DrainRunner

__all__ = ["InPlace"]

_UNSETTLED = (VmStep.PENDING, VmStep.LIVE_SCHEDULED, VmStep.LIVE_MIGRATING)
_FINAL = ("Succeeded", "Failed")


class InPlace:
    def __init__(self, runner: DrainRunner) -> None:
        self.r = runner
        self.opts = runner.options

    def advance(self, drain: Drain, rows: list[DrainVm]) -> None:
        steps = {r.step for r in rows}
        if VmStep.IN_PLACE_RUNNING in steps:
            self._running(drain, [r for r in rows if r.step is VmStep.IN_PLACE_RUNNING])
        elif VmStep.IN_PLACE_SCHEDULED in steps:
            self._scheduled(drain, [r for r in rows if r.step is VmStep.IN_PLACE_SCHEDULED])
        elif VmStep.IN_PLACE_WAITING in steps and not steps & set(_UNSETTLED):
            self._schedule(drain)

    def _rows(self, session: Session, drain: Drain, step: VmStep) -> list[DrainVm]:
        query = select(DrainVm).where(DrainVm.drain == drain.id, DrainVm.step == step).with_for_update()
        return list(session.scalars(query))

    def _schedule(self, drain: Drain) -> None:
        now = self.r.clock()

        def body(session: Session, current: Drain) -> None:
            for row in self._rows(session, current, VmStep.IN_PLACE_WAITING):
                if current.cancel_requested:
                    set_step(row, VmStep.DONE, outcome=VmOutcome.BLOCKED, reason=f"Canceled ({row.reason})")
                    continue
                row.event_id = se.schedule(
                    session, vm_id=row.vm_id, host=current.host, host_vm_name=row.host_vm_name, event_type="Freeze",
                    not_before=now + current.notice_s, duration_s=self.opts.freeze_in_place_s,
                    description=f"Host {current.reason.value}: the VM is paused while its host's software is updated",
                )  # fmt: skip
                set_step(row, VmStep.IN_PLACE_SCHEDULED, not_before=now + current.notice_s, started_at=now)
                data = {
                    "vm": row.name, "host": current.host, "drain": current.id, "method": row.method.value,
                    "eventId": row.event_id, "eventType": "Freeze", "notBefore": se.rfc1123(now + current.notice_s),
                }  # fmt: skip
                session.add(Event(type="cvmotion.maintenance.scheduled", subject=row.vm_id, data=data))

        self.r.txn(drain.id, body, point="Drain:InPlaceScheduled")

    def _due(self, drain: Drain, row: DrainVm, guest: list[str]) -> bool:
        if row.not_before is not None and self.r.clock() >= row.not_before:
            return True
        if row.event_id in guest:
            self.r.txn(drain.id, lambda s, _d: se.approve(s, row.vm_id, [row.event_id or ""], "guest"))
            return True
        return bool(self.r.read(lambda s: se.approved(s, row.vm_id, row.event_id)))

    def _scheduled(self, drain: Drain, rows: list[DrainVm]) -> None:
        if drain.cancel_requested:
            for row in rows:
                self.r.ladder.finish(
                    drain, row, VmOutcome.BLOCKED, f"Canceled before the in-place update ({row.reason})"
                )
            return
        api = self.r.host_api(drain.host)
        due = [self._due(drain, row, se.guest_approvals(api, row.host_vm_name) if api else []) for row in rows]
        if not all(due):
            return  # one pause for the whole host: it starts when every VM's event may start
        now = self.r.clock()
        before = {r.name: attestation_facts(api.attestation(r.host_vm_name)) if api else {} for r in rows}

        def body(session: Session, current: Drain) -> None:
            current.in_place_id = f"mpu-{current.id}"
            current.in_place = {
                "id": current.in_place_id,
                "status": "Requested",
                "deadline": now + self.opts.in_place_timeout_s,
            }
            for row in self._rows(session, current, VmStep.IN_PLACE_SCHEDULED):
                se.start(session, row.vm_id, row.event_id or "")
                set_step(row, VmStep.IN_PLACE_RUNNING, attestation_before=before.get(row.name, {}))
                data = {"vm": row.name, "host": current.host, "drain": current.id, "method": row.method.value}
                session.add(Event(type="cvmotion.maintenance.started", subject=row.vm_id, data=data))

        self.r.txn(drain.id, body, point="Drain:InPlaceRunning")

    def _running(self, drain: Drain, rows: list[DrainVm]) -> None:
        api = self.r.host_api(drain.host)
        record: dict[str, Any] | None = None
        why = ""
        if api is not None and drain.in_place_id:
            try:
                if drain.in_place.get("status") == "Requested":
                    record = api.start_maintenance(drain.in_place_id)  # the same id again: the same record
                    self.r.fault("Drain:InPlaceAnswered")
                else:
                    record = api.maintenance(drain.in_place_id)
            except HostUnreachable:
                record = None  # its daemon restarts: the port refuses connections for a moment
            except NotFound:
                if drain.in_place.get("status") == "Requested":
                    why = f"host {drain.host} does not serve memory-preserving updates (POST /v1/host/maintenance: 404)"
                else:  # the host lost the record: ask again with the same id
                    self.r.txn(drain.id, lambda _s, d: d.in_place.update(status="Requested") or None)
            except Conflict as exc:
                record = None  # another update is running on the host: wait for it (bounded by the deadline)
                why = str(exc)
            except CvmError as exc:
                why = str(exc)
        deadline = float(drain.in_place.get("deadline", 0))
        if record is not None:
            self._record(drain, record)
            if record.get("status") in _FINAL:
                self._settle(drain, rows, record)
                return
        if why and "404" in why:
            self._fail_all(drain, rows, why)
        elif self.r.clock() > deadline:
            self._fail_all(drain, rows, f"InPlaceTimeout: the host's update did not end in time {why}".strip())

    def _record(self, drain: Drain, record: dict[str, Any]) -> None:
        keep = {
            k: record.get(k)
            for k in ("id", "status", "startedAt", "endedAt", "platformRestarted", "daemonRestarted", "error")
        }
        if all(drain.in_place.get(k) == v for k, v in keep.items()):
            return

        def body(_s: Session, current: Drain) -> None:
            current.in_place = {**current.in_place, **keep}

        self.r.txn(drain.id, body)

    def _fail_all(self, drain: Drain, rows: list[DrainVm], why: str) -> None:
        for row in rows:
            self.r.ladder.finish(drain, row, VmOutcome.FAILED, why)

    def _settle(self, drain: Drain, rows: list[DrainVm], record: dict[str, Any]) -> None:
        per_vm = {str(v.get("name")): v for v in record.get("vms", []) if isinstance(v, dict)}
        api = self.r.host_api(drain.host)
        after = {r.name: attestation_facts(api.attestation(r.host_vm_name)) if api else {} for r in rows}

        def body(session: Session, current: Drain) -> None:
            for row in self._rows(session, current, VmStep.IN_PLACE_RUNNING):
                mine = per_vm.get(row.host_vm_name)
                se.finish(session, row.vm_id, row.event_id)
                if mine is None:
                    error = record.get("error") or "the host's record does not list the VM"
                    set_step(row, VmStep.DONE, outcome=VmOutcome.FAILED, reason=f"InPlaceFailed: {error}")
                    continue
                pause = mine.get("pauseMs")
                ok = mine.get("outcome") == "Succeeded"
                new = after.get(row.name, {})
                reason = row.reason if ok else f"InPlaceFailed: {mine.get('reason') or record.get('error')}"
                set_step(
                    row, VmStep.DONE, outcome=VmOutcome.SUCCEEDED if ok else VmOutcome.FAILED, pause_ms=pause,
                    downtime_ms=pause, reason=reason, attestation_after=new, to_host=current.host,
                )  # fmt: skip
                data = {"vm": row.name, "from": current.host, "reason": row.reason, "method": row.method.value,
                        "pauseMs": pause}  # fmt: skip
                session.add(Event(type="cvmotion.maintenance.fallback", subject=row.vm_id, data=data))
                vm = session.get(Vm, row.vm_id)
                if ok and mine.get("reattested") and new.get("tokenId"):
                    if vm is not None:
                        vm.attestation = {**vm.attestation, **{k: v for k, v in new.items() if v is not None}}
                    attest = {"vm": row.name, "old": row.attestation_before, "new": new}
                    session.add(Event(type="cvmotion.vm.postMigrationAttestation", subject=row.vm_id, data=attest))

        self.r.txn(drain.id, body, point="Drain:InPlaceSettled")
