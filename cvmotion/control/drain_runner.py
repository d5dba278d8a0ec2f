"""control layer: the drain runner — claims running drains and moves each of their VMs one step per tick.

One runner thread per replica.  A drain is held through a lease (``claimed_by``, ``lease_until``),
renewed by every write, and every write re-checks the claim first (fencing), as the operation worker
does; on PostgreSQL the claim is ``FOR UPDATE SKIP LOCKED``, on SQLite the restarted controller frees
every claim at once.  A tick: ``Accepted`` → ``Running``; each VM's ladder step (``control.ladder``);
the host's in-place update (``control.in_place``); the Scheduled Events documents that changed are
published to their hosts; when every VM is done, the drain's status and ``cvmotion.maintenance.completed``.
Everything a tick decides is committed before any host is asked, so a SIGKILL between any two lines loses
nothing: the next runner reads the recorded steps and asks the hosts what already happened.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import or_, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from cvmotion.control import scheduled_events as se
from cvmotion.control.db import Event, Host
from cvmotion.control.db_maintenance import Drain, DrainVm, ScheduledEventsDoc
from cvmotion.control.drains import host_subject
from cvmotion.control.drainstates import ACTIVE_DRAIN, DrainStatus, VmOutcome, VmStep
from cvmotion.control.hostclient import HostApi
from cvmotion.control.in_place import InPlace
from cvmotion.control.ladder import Ladder
from cvmotion.control.maintenance_options import MaintenanceOptions
from cvmotion.control.redeploy import Redeploy
from cvmotion.control.resources import HostState
from cvmotion.control.vms import VmService
from cvmotion.control.worker import LostClaim, _fault

__all__ = ["DrainRunner", "release_drain_claims"]

log = logging.getLogger("cvmotion.control.drains")
T = TypeVar("T")
_NOT_ACTED = (
    VmStep.PENDING, VmStep.LIVE_SCHEDULED, VmStep.IN_PLACE_WAITING, VmStep.IN_PLACE_SCHEDULED,
    VmStep.REDEPLOY_SCHEDULED,
)  # fmt: skip


class DrainRunner:
    def __init__(
        self,
        engine: Engine,
        runner_id: str,
        vms: VmService,
        *,
        options: MaintenanceOptions | None = None,
        write_lock: threading.Lock | None = None,
        reader: Engine | None = None,
        wake_workers: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.reader = reader or engine
        self.id = runner_id
        self.vms = vms
        self.options = options or MaintenanceOptions()
        self.write_lock = write_lock
        self.wake_workers = wake_workers
        self.clock = clock
        self.wake = threading.Event()
        self.ladder = Ladder(self)
        self.in_place = InPlace(self)
        self.redeploy = Redeploy(self)

    # -- transactions ------------------------------------------------------------------------------

    def _locked(self) -> contextlib.AbstractContextManager[Any]:
        return self.write_lock if self.write_lock is not None else contextlib.nullcontext()

    def txn(self, drain_id: str, body: Callable[[Session, Drain], T], *, point: str | None = None) -> T:
        """``body`` in a transaction after checking the drain's claim is still ours; renews the lease."""
        with self._locked(), Session(self.engine, expire_on_commit=False) as session, session.begin():
            drain = session.get(Drain, drain_id, with_for_update=True)
            if drain is None or drain.claimed_by != self.id:
                raise LostClaim(drain_id)
            drain.lease_until = time.time() + self.options.lease_s
            drain.updated_at = time.time()
            result = body(session, drain)
        if point is not None:
            self.fault(point)
        return result

    @staticmethod
    def fault(point: str) -> None:
        _fault(point)  # the crash tests' kill point (CVMOTION_FAULT_KILL_FILE); nothing in production

    def read(self, body: Callable[[Session], T]) -> T:
        with Session(self.reader, expire_on_commit=False) as session, session.begin():
            result = body(session)
            session.expunge_all()
            return result

    def host_api(self, name: str) -> HostApi | None:
        host = self.read(lambda s: s.get(Host, name))
        return HostApi(host.api_url) if host is not None else None

    # -- claims ------------------------------------------------------------------------------------

    def claim(self) -> list[str]:
        """Claim every running drain that nobody holds (or whose holder's lease ran out); ours, including held."""
        now = time.time()
        claimable = (
            Drain.status.in_(ACTIVE_DRAIN),
            or_(Drain.claimed_by.is_(None), Drain.lease_until < now, Drain.claimed_by == self.id),
        )
        ids = self.read(lambda s: list(s.scalars(select(Drain.id).where(*claimable))))
        if not ids:
            return []
        with self._locked(), Session(self.engine) as session, session.begin():
            query = select(Drain).where(Drain.id.in_(ids), *claimable).with_for_update(skip_locked=True)
            mine = []
            for drain in session.scalars(query):
                drain.claimed_by, drain.lease_until = self.id, now + self.options.lease_s
                mine.append(drain.id)
            return mine

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                ids = self.claim()
            except Exception:
                log.exception("claiming drains failed (database unavailable?); retrying")
                stop.wait(self.options.poll_s * 5)
                continue
            for drain_id in ids:
                if stop.is_set():
                    return
                try:
                    self.tick(drain_id)
                except LostClaim:
                    log.warning("drain %s: claim lost to another runner", drain_id)
                except Exception:
                    log.exception("drain %s: tick failed; retried at the next tick", drain_id)
            self.wake.wait(self.options.poll_s)
            self.wake.clear()

    # -- one tick ----------------------------------------------------------------------------------

    def _load(self, drain_id: str) -> tuple[Drain, list[DrainVm]]:
        def body(session: Session, drain: Drain) -> tuple[Drain, list[DrainVm]]:
            if drain.status is DrainStatus.ACCEPTED:
                drain.status = DrainStatus.RUNNING
                data = {"host": drain.host, "drain": drain.id, "reason": drain.reason.value}
                session.add(Event(type="cvmotion.maintenance.started", subject=host_subject(drain.host), data=data))
            rows = list(session.scalars(select(DrainVm).where(DrainVm.drain == drain.id).order_by(DrainVm.id)))
            session.expunge_all()
            return drain, rows

        result: tuple[Drain, list[DrainVm]] = self.txn(drain_id, body)
        return result

    def tick(self, drain_id: str) -> None:
        drain, rows = self._load(drain_id)
        source = self.read(lambda s: s.get(Host, drain.host))
        if source is None or source.state is not HostState.AVAILABLE:
            self._source_lost(drain, rows)
            drain, rows = self._load(drain_id)
        for row in rows:
            self.ladder.advance(drain, row)
        drain, rows = self._load(drain_id)
        self.in_place.advance(drain, rows)
        self._publish(drain, [r.vm_id for r in rows])
        drain, rows = self._load(drain_id)
        if all(r.step is VmStep.DONE for r in rows):
            self._complete(drain_id)

    def _source_lost(self, drain: Drain, rows: list[DrainVm]) -> None:
        """The host stopped answering: VMs whose step has not acted yet are reported now, not after their notice.

        Steps that already act finish on their own terms (a move's operation, the in-place update's and the
        stop's timeouts): a daemon restarting for the in-place update also misses heartbeats for a moment.
        """
        why = (
            f"SourceUnavailable: host {drain.host} stopped answering before this VM's step started; the VM is left"
            " where it is (never started elsewhere while its host may still run it)"
        )
        for row in rows:
            if row.step in _NOT_ACTED:
                self.ladder.finish(drain, row, VmOutcome.FAILED, why)

    def _publish(self, drain: Drain, vm_ids: list[str]) -> None:
        """Publish each changed Scheduled Events document to its host (best effort: a notice is advisory)."""
        for doc in self.read(lambda s: se.unpublished(s, vm_ids)):
            api = self.host_api(doc.host or "")
            if api is None:
                continue
            outcome, incarnation = se.publish(api, doc)
            if outcome == "later":
                continue

            self.txn(drain.id, functools.partial(_published, doc=doc, outcome=outcome, incarnation=incarnation))

    def _complete(self, drain_id: str) -> None:
        def body(session: Session, drain: Drain) -> None:
            rows = list(session.scalars(select(DrainVm).where(DrainVm.drain == drain.id)))
            outcomes = [r.outcome for r in rows]
            succeeded = outcomes.count(VmOutcome.SUCCEEDED)
            if drain.cancel_requested:
                drain.status = DrainStatus.CANCELED
            elif succeeded == len(rows):
                drain.status = DrainStatus.SUCCEEDED
            elif succeeded == 0:
                drain.status = DrainStatus.FAILED
            else:
                drain.status = DrainStatus.PARTIALLY_SUCCEEDED
            drain.active_host, drain.claimed_by, drain.ended_at = None, None, time.time()
            data = {
                "host": drain.host,
                "drain": drain.id,
                "reason": drain.reason.value,
                "status": drain.status.value,
                "vms": [
                    {"vm": r.name, "method": r.method.value, "outcome": r.outcome and r.outcome.value} for r in rows
                ],
            }
            session.add(Event(type="cvmotion.maintenance.completed", subject=host_subject(drain.host), data=data))

        self.txn(drain_id, body, point="Drain:Completed")


def _published(session: Session, _drain: Drain, *, doc: ScheduledEventsDoc, outcome: str, incarnation: int) -> None:
    row = session.get(ScheduledEventsDoc, doc.vm_id, with_for_update=True)
    if row is None or row.incarnation != doc.incarnation:
        return  # changed meanwhile: published at the next tick
    if outcome == "stored":
        row.published = incarnation
    else:  # the host holds a newer document: ours goes past it
        row.incarnation = incarnation + 1


def release_drain_claims(engine: Engine) -> None:
    """Free every drain claim: only for a database this process owns alone (SQLite under the leader lock)."""
    with Session(engine) as session, session.begin():
        session.execute(update(Drain).where(Drain.status.in_(ACTIVE_DRAIN)).values(claimed_by=None, lease_until=0.0))
