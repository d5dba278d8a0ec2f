"""A move the worker finds already finished on the destination keeps its figures.

A predecessor asked the source to migrate and died before it recorded the migration's id (the
``Migrate:HostAnswered`` crash point); its successor finds the VM running on the destination.  The
source keeps finished migrations, so the successor records ``VmMigrated`` with the source's figures
(totalMs, downtimeMs, bytes) and the migration's id on the operation, not a move without timings.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from control_harness import OPTED_IN_ON_H1
from sqlalchemy import select

from cvmotion.control.db import Event, Operation
from cvmotion.control.inventory import HostRegistration
from cvmotion.control.operations import Step
from cvmotion.control.service import FleetController
from cvmotion.control.worker import Worker
from cvmotion.testing.fakehost import FakeHost

BODY = OPTED_IN_ON_H1


@pytest.fixture
def hosts() -> Iterator[dict[str, FakeHost]]:
    made = {n: FakeHost(n, "pool-a") for n in ("h1", "h2")}
    for h in made.values():
        h.__enter__()
    yield made
    for h in made.values():
        h.__exit__()


@pytest.fixture
def ctl(tmp_path: Path, hosts: dict[str, FakeHost]) -> Iterator[FleetController]:
    controller = FleetController(tmp_path / "ctl", workers=0)  # the test drives one worker itself
    controller.start()
    for host in hosts.values():
        body = HostRegistration.model_validate(host.registration())
        controller.transaction(lambda s, b=body: controller.inventory.register(s, b))
    yield controller
    controller.stop()


def _run_one(ctl: FleetController) -> None:
    worker = Worker(ctl.engine, "test-worker", write_lock=ctl.write_lock, reader=ctl.reader)
    claimed = worker.claim_op()
    assert claimed is not None
    worker.execute(claimed[0], claimed[1:])


def _moved_after_the_fact(
    ctl: FleetController, hosts: dict[str, FakeHost], *, source_forgets: bool = False
) -> tuple[Operation, dict[str, Any]]:
    """Create the VM on h1, move it to h2 behind the controller's back, then have the worker finish the move."""
    vm, _op, _ = ctl.transaction(lambda s: ctl.vms.put(s, "default", "rg1", "mover", BODY))
    _run_one(ctl)
    move = ctl.transaction(lambda s: ctl.vms.migrate(s, "default", "rg1", "mover", "h2"))

    def requested(s: Any) -> None:
        s.get(Operation, move.id).step = Step.HOST_REQUESTED  # committed by the predecessor before it asked

    ctl.transaction(requested)
    # What the predecessor did before it died: the source was asked and answered; nothing recorded.
    started = httpx.post(
        f"{hosts['h1'].url}/v1/vms/{vm.host_vm_name}/migrate", json={"destination": hosts["h2"].url}, timeout=10
    )
    started.raise_for_status()
    assert vm.host_vm_name in hosts["h2"].vms
    if source_forgets:
        hosts["h1"].migrations.clear()  # a source restarted since keeps no record
    _run_one(ctl)

    def read(s: Any) -> tuple[Operation, dict[str, Any]]:
        op = s.get(Operation, move.id)
        [event] = s.scalars(select(Event).where(Event.type == "VmMigrated"))
        return op, dict(event.data)

    op, data = ctl.transaction(read)
    assert op.step is Step.SUCCEEDED
    return op, data | {"_started": started.json()}


def test_a_finished_move_keeps_the_sources_figures(ctl: FleetController, hosts: dict[str, FakeHost]) -> None:
    op, data = _moved_after_the_fact(ctl, hosts)
    record = data.pop("_started")
    assert op.migration_id == record["migration"]  # the operation names the migration found on the source
    assert data["migration"] == record["migration"]
    assert (data["from"], data["to"]) == ("h1", "h2")
    assert (data["totalMs"], data["downtimeMs"]) == (record["total-time"], record["downtime"])
    assert data["bytes"] == record["ram"]["transferred"]


def test_a_source_that_forgot_the_move_leaves_it_recorded_without_figures(
    ctl: FleetController, hosts: dict[str, FakeHost]
) -> None:
    # The VM still counts as moved (it runs on the destination); there are no figures to keep.
    op, data = _moved_after_the_fact(ctl, hosts, source_forgets=True)
    assert op.migration_id is None
    assert data["to"] == "h2"
    assert "totalMs" not in data
