"""A started migration whose source stops answering gives its fleet slot back after a grace, and takes it again.

A failed host's moves would otherwise hold slots of the fleet's limit for its whole outage while every other
host's moves wait (the maintenance wave's failed hosts did exactly that).  The operation stays open — only
the source can say how the move ended — unless the destination already runs the VM.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from control_harness import OPTED_IN_ON_H1
from sqlalchemy import select

from cvmotion.control.db import Operation
from cvmotion.control.errors import HostUnreachable
from cvmotion.control.hostclient import HostApi
from cvmotion.control.operations import OperationKind, Step
from cvmotion.control.service import FleetController
from cvmotion.control.worker import SILENT_SOURCE_GRACE_S, Worker
from cvmotion.testing.fakehost import FakeHost

LIMIT = 2
BODY = OPTED_IN_ON_H1


@pytest.fixture
def ctl(workerless: FleetController) -> FleetController:
    return workerless


@pytest.fixture
def hosts(fakehosts: dict[str, FakeHost]) -> dict[str, FakeHost]:
    return fakehosts


def _worker(ctl: FleetController, name: str = "w") -> Worker:
    return Worker(ctl.engine, name, write_lock=ctl.write_lock, reader=ctl.reader, parallel_migrations=LIMIT)


def _op(ctl: FleetController, op_id: str) -> Operation:
    return ctl.transaction(lambda s: s.get(Operation, op_id))  # type: ignore[no-any-return]


def _migrating(ctl: FleetController, *names: str) -> list[str]:
    """VMs created on h1 and a move of each to h2 that its source has started (``Migrating``, id ``m-NAME``)."""
    for name in names:
        ctl.transaction(lambda s, n=name: ctl.vms.put(s, "default", "rg1", n, BODY))
    worker = _worker(ctl, "creator")
    while (claimed := worker.claim_op()) is not None:
        worker.execute(claimed[0], claimed[1:])
    ids = []
    for name in names:
        move = ctl.transaction(lambda s, n=name: ctl.vms.migrate(s, "default", "rg1", n, "h2"))

        def started(s: Any, op_id: str = move.id, mig_id: str = f"m-{name}") -> None:
            op = s.get(Operation, op_id)
            op.step, op.migration_id = Step.MIGRATING, mig_id

        ctl.transaction(started)
        ids.append(str(move.id))
    return ids


def _source(monkeypatch: pytest.MonkeyPatch, answers: list[Callable[[], dict[str, Any]]]) -> list[str]:
    """The source's answers to ``GET /v1/migrations/{id}``, in order; the ids asked."""
    asked: list[str] = []

    def migration(_api: HostApi, mig_id: str, *, wait: float = 0.0) -> dict[str, Any]:
        asked.append(mig_id)
        return answers.pop(0)()

    monkeypatch.setattr(HostApi, "migration", migration)
    return asked


def _silent() -> dict[str, Any]:
    raise HostUnreachable("host h1 did not answer GET /v1/migrations: connection refused")


def _run(worker: Worker, op_id: str) -> None:
    claimed = worker.claim_op()
    assert claimed is not None
    assert claimed[0] == op_id
    worker.execute(claimed[0], claimed[1:])


def _queued_migrations(ctl: FleetController, count: int) -> None:
    def add(s: Any) -> None:
        for i in range(count):
            s.add(Operation(id=f"queued-{i}", kind=OperationKind.MIGRATE, step=Step.ACCEPTED, resource_id=f"/q{i}",
                            subscription="s", host="h1"))  # fmt: skip

    ctl.transaction(add)


def test_a_silent_source_lets_the_operation_go_and_keeps_it_open(
    ctl: FleetController, monkeypatch: pytest.MonkeyPatch
) -> None:
    [op_id] = _migrating(ctl, "vm1")
    _source(monkeypatch, [_silent])
    before = time.time()
    _run(_worker(ctl), op_id)
    op = _op(ctl, op_id)
    assert op.step is Step.MIGRATING  # only the source can say how the move ended
    assert op.source_silent_since is not None
    assert op.source_silent_since >= before
    assert op.claimed_by is None  # no worker sits on a host that does not answer
    assert op.lease_until > time.time()  # asked again after a pause, not in a loop
    assert "did not answer" in op.error_message


def test_a_silent_source_gives_its_slot_back_only_after_the_grace(ctl: FleetController) -> None:
    first, second = _migrating(ctl, "vm1", "vm2")  # LIMIT started moves: the fleet is full
    _queued_migrations(ctl, 1)

    def held(s: Any, silent_since: float | None) -> None:
        for op_id in (first, second):  # each carried by a live worker elsewhere
            op = s.get(Operation, op_id)
            op.claimed_by, op.lease_until = "elsewhere", time.time() + 3600
        s.get(Operation, first).source_silent_since = silent_since

    ctl.transaction(lambda s: held(s, None))
    assert _worker(ctl, "late").claim_op() is None
    ctl.transaction(lambda s: held(s, time.time() - 1))
    assert _worker(ctl, "late").claim_op() is None  # silent, but not yet for the grace
    ctl.transaction(lambda s: held(s, time.time() - SILENT_SOURCE_GRACE_S - 1))
    claimed = _worker(ctl, "late").claim_op()
    assert claimed is not None
    assert claimed[0] == "queued-0"  # the silent move's slot
    assert _worker(ctl, "later").claim_op() is None  # and only that one


def test_a_source_that_answers_again_takes_its_slot_back(ctl: FleetController, monkeypatch: pytest.MonkeyPatch) -> None:
    [op_id] = _migrating(ctl, "vm1")
    seen: list[float | None] = []

    def completed() -> dict[str, Any]:
        seen.append(_op(ctl, op_id).source_silent_since)  # as the source's second answer arrives
        return {"status": "completed", "total-time": 900, "downtime": 20, "x-cvmotion": {"id": "m-vm1", "vm": "x"}}

    def active() -> dict[str, Any]:
        return {"status": "active"}

    asked = _source(monkeypatch, [_silent, active, completed])
    _run(_worker(ctl), op_id)
    assert _op(ctl, op_id).source_silent_since is not None

    ctl.transaction(lambda s: setattr(s.get(Operation, op_id), "lease_until", 0.0))  # its retry is due
    _run(_worker(ctl), op_id)
    assert seen == [None]  # counted again from its first answer on
    assert asked == ["m-vm1"] * 3
    assert _op(ctl, op_id).step is Step.SUCCEEDED


def test_a_move_that_arrived_before_its_source_went_silent_succeeds(
    ctl: FleetController, hosts: dict[str, FakeHost], monkeypatch: pytest.MonkeyPatch
) -> None:
    [op_id] = _migrating(ctl, "vm1")
    name = next(iter(hosts["h1"].vms))
    hosts["h2"].vms[name] = hosts["h1"].vms.pop(name) | {"host": "h2", "state": "running"}  # committed there
    _source(monkeypatch, [_silent])
    _run(_worker(ctl), op_id)
    op = _op(ctl, op_id)
    assert op.step is Step.SUCCEEDED
    row = ctl.transaction(lambda s: s.scalars(select(Operation).where(Operation.id == op_id)).one())
    assert row.claimed_by is None
