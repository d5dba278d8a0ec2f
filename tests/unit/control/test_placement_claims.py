"""A live migration in flight uses its destination as well as its source (Nova's migration claim).

Many moves asked for at once must spread over the destinations and never overfill one: before, every move saw
the same emptiest host (a VM counted only where it runs), and the fleet simulation sent 176 moves to one host.
"""

from __future__ import annotations

import pytest
from control_harness import OPTED_IN_ON_H1

from cvmotion.control.inventory import HostRegistration
from cvmotion.control.operations import Step
from cvmotion.control.service import FleetController
from cvmotion.control.worker import Worker
from cvmotion.errors import Conflict
from cvmotion.testing.fakehost import FakeHost


def _on_h1(ctl: FleetController, *names: str) -> None:
    for name in names:
        ctl.transaction(lambda s, n=name: ctl.vms.put(s, "default", "rg1", n, OPTED_IN_ON_H1))
    worker = Worker(ctl.engine, "creator", write_lock=ctl.write_lock, reader=ctl.reader)
    while (claimed := worker.claim_op()) is not None:
        worker.execute(claimed[0], claimed[1:])


def _move(ctl: FleetController, name: str) -> str:
    op = ctl.transaction(lambda s: ctl.vms.migrate(s, "default", "rg1", name, None))
    assert op.step is Step.ACCEPTED
    return str(op.target_host)


def _resize(ctl: FleetController, host: FakeHost, vcpus: int) -> None:
    body = HostRegistration.model_validate(host.registration(vcpus=vcpus, memory_gib=64))
    ctl.transaction(lambda s: ctl.inventory.register(s, body))


def test_moves_asked_at_once_spread_over_the_destinations(
    workerless: FleetController, fakehosts: dict[str, FakeHost]
) -> None:
    _on_h1(workerless, "a", "b", "c", "d")
    targets = [_move(workerless, n) for n in ("a", "b", "c", "d")]
    assert sorted(targets) == ["h2", "h2", "h3", "h3"]  # each open move counts on its destination


def test_an_open_move_holds_its_destinations_capacity(
    workerless: FleetController, fakehosts: dict[str, FakeHost]
) -> None:
    _on_h1(workerless, "a", "b")
    _resize(workerless, fakehosts["h3"], 1)  # too small for any of them
    _resize(workerless, fakehosts["h2"], 3)  # room for one 2-vCPU VM
    assert _move(workerless, "a") == "h2"
    with pytest.raises(Conflict, match="vCPUs free"):
        _move(workerless, "b")  # h2's room is the open move's


def test_a_settled_move_counts_once(workerless: FleetController, fakehosts: dict[str, FakeHost]) -> None:
    _on_h1(workerless, "a", "b")
    _resize(workerless, fakehosts["h3"], 1)
    _resize(workerless, fakehosts["h2"], 5)  # room for two
    assert _move(workerless, "a") == "h2"
    worker = Worker(workerless.engine, "mover", write_lock=workerless.write_lock, reader=workerless.reader)
    claimed = worker.claim_op()
    assert claimed is not None
    worker.execute(claimed[0], claimed[1:])  # the fake hosts move it at once
    assert len(fakehosts["h2"].vms) == 1
    assert _move(workerless, "b") == "h2"  # a's 2 vCPUs counted there once, not twice
