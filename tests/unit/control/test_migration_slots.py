"""The fleet's limit of live migrations in flight (KubeVirt's ``parallelMigrationsPerCluster``) holds at claim time.

A worker claims a migration only while fewer than the limit are started (``HostRequested`` or ``Migrating``), and
starts it in the claim's own transaction, so the limit is exact however many workers — of however many
replicas — claim at once; other operations are not held up behind the queued migrations.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import func, select

from cvmotion.control.db import Operation
from cvmotion.control.operations import OperationKind, Step
from cvmotion.control.service import FleetController
from cvmotion.control.worker import Worker
from cvmotion.testing.postgres import PostgresServer

LIMIT = 3


@pytest.fixture
def ctl(tmp_path: Path) -> Iterator[FleetController]:
    controller = FleetController(tmp_path / "ctl", workers=0)
    controller.start()
    yield controller
    controller.stop()


def _queue(ctl: FleetController, kind: OperationKind, count: int, step: Step = Step.ACCEPTED) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(count)]

    def add(session: object) -> None:
        for i, op_id in enumerate(ids):
            session.add(  # type: ignore[attr-defined]
                Operation(id=op_id, kind=kind, step=step, resource_id=f"/vm{i}", subscription="s", host=f"h{i % 4}")
            )

    ctl.transaction(add)
    return ids


def _worker(ctl: FleetController, name: str) -> Worker:
    return Worker(ctl.engine, name, write_lock=ctl.write_lock, reader=ctl.reader, parallel_migrations=LIMIT)


def _started(ctl: FleetController) -> int:
    query = select(func.count()).select_from(Operation)
    query = query.where(Operation.kind == OperationKind.MIGRATE, Operation.step == Step.HOST_REQUESTED)
    return int(ctl.transaction(lambda s: s.scalar(query)))


def test_no_more_migrations_start_than_the_limit(ctl: FleetController) -> None:
    _queue(ctl, OperationKind.MIGRATE, 8)
    workers = [_worker(ctl, f"w{i}") for i in range(6)]
    claims = [w.claim_op() for w in workers]
    taken = [c for c in claims if c is not None]
    assert len(taken) == LIMIT
    assert all(kind is OperationKind.MIGRATE and step is Step.ACCEPTED for _, kind, step in taken)  # as claimed
    assert _started(ctl) == LIMIT  # started by the claim itself: the slot was taken when it committed


def test_other_operations_pass_the_queued_migrations(ctl: FleetController) -> None:
    _queue(ctl, OperationKind.MIGRATE, 5)
    [create] = _queue(ctl, OperationKind.CREATE, 1, Step.PLACED)
    workers = [_worker(ctl, f"w{i}") for i in range(5)]
    claimed = {c[0] for w in workers if (c := w.claim_op()) is not None}
    assert create in claimed
    assert len(claimed) == LIMIT + 1


def test_a_settled_migration_frees_its_slot(ctl: FleetController) -> None:
    _queue(ctl, OperationKind.MIGRATE, 5)
    first = [_worker(ctl, f"w{i}").claim_op() for i in range(LIMIT)]
    assert _worker(ctl, "late").claim_op() is None
    assert first[0] is not None
    settled = first[0][0]
    ctl.transaction(lambda s: setattr(s.get(Operation, settled), "step", Step.SUCCEEDED))
    again = _worker(ctl, "late").claim_op()
    assert again is not None
    assert again[1] is OperationKind.MIGRATE


def test_a_started_migration_keeps_its_slot_when_its_holder_dies(ctl: FleetController) -> None:
    """Its host may still be moving the VM: the slot is the migration's, not the claim's."""
    [held] = _queue(ctl, OperationKind.MIGRATE, 1, Step.MIGRATING)
    _queue(ctl, OperationKind.MIGRATE, 4)
    claims = [_worker(ctl, f"w{i}").claim_op() for i in range(5)]
    ids = [c[0] for c in claims if c is not None]
    assert held in ids  # resumed by a successor (its lease was never taken)
    assert len(ids) == LIMIT  # the held one and LIMIT - 1 new ones


def _race(replicas: list[FleetController]) -> int:
    """Twelve workers spread over the replicas claim at once, each until it gets nothing; the started count."""
    barrier = threading.Barrier(12)

    def claim(i: int) -> int:
        worker = _worker(replicas[i % len(replicas)], f"w{i}")
        barrier.wait(10)
        got = 0
        while worker.claim_op() is not None:
            got += 1
        return got

    with ThreadPoolExecutor(12) as pool:
        total = sum(pool.map(claim, range(12)))
    assert total == LIMIT
    return _started(replicas[0])


def test_concurrent_claims_on_sqlite(ctl: FleetController) -> None:
    _queue(ctl, OperationKind.MIGRATE, 20)
    assert _race([ctl]) == LIMIT


def test_concurrent_claims_of_two_replicas_on_postgresql(tmp_path: Path, postgres: PostgresServer) -> None:
    url = postgres.database()
    replicas = [FleetController(tmp_path / f"r{i}", url, workers=0) for i in range(2)]
    for replica in replicas:
        replica.start()
    try:
        _queue(replicas[0], OperationKind.MIGRATE, 20)
        assert _race(replicas) == LIMIT
    finally:
        for replica in replicas:
            replica.stop()
