"""Concurrent creates never overfill a host: the capacity is counted after the host rows are locked.

The create path takes the host lock last (after the name, the size and the policy), so this checks the
lock still covers the read of the capacity and the write of the VM: many threads creating at once on
SQLite (one replica), and two replicas (two controllers in this process, each with its own pool) on one
PostgreSQL database when the server binaries are installed.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from cvmotion.control.db import Vm
from cvmotion.control.inventory import HostRegistration
from cvmotion.control.resources import VmPut
from cvmotion.control.service import FleetController
from cvmotion.errors import Conflict
from cvmotion.testing.fakehost import FakeHost
from cvmotion.testing.postgres import PostgresServer

BODY = VmPut.model_validate(
    {
        "properties": {
            "hardwareProfile": {"vmSize": "Standard_DC2as_v5"},  # 2 vCPUs, 8 GiB
            "storageProfile": {"imageReference": {"id": "kvstore"}},
        }
    }
)
CREATES = 24


def _register(ctl: FleetController, name: str, vcpus: int) -> None:
    # Not served: the workers' creates fail (nothing listens there), the placements under test do not.
    body = FakeHost(name, "pool-a").registration(vcpus=vcpus, memory_gib=1024)
    ctl.transaction(lambda s: ctl.inventory.register(s, HostRegistration.model_validate(body)))


def _race(replicas: list[FleetController]) -> tuple[list[str], dict[str, int]]:
    def create(i: int) -> str:
        ctl = replicas[i % len(replicas)]
        try:
            ctl.transaction(lambda s: ctl.vms.put(s, "sub", "rg", f"vm{i}", BODY))
        except Conflict:
            return "409"
        return "202"

    with ThreadPoolExecutor(16) as pool:
        answers = sorted(pool.map(create, range(CREATES)))

    def used(s: Any) -> dict[str, int]:
        rows = s.execute(select(Vm.host, func.sum(Vm.vcpus)).where(Vm.host.is_not(None)).group_by(Vm.host))
        return {str(host): int(vcpus) for host, vcpus in rows}

    return answers, replicas[0].transaction(used)


def _controller(path: Path, db: str | None) -> FleetController:
    ctl = FleetController(path, db, workers=0)  # no workers: the placements are the test
    ctl.start()
    return ctl


def test_concurrent_creates_fill_hosts_exactly_sqlite(tmp_path: Path) -> None:
    ctl = _controller(tmp_path / "ctl", None)
    try:
        _register(ctl, "small-1", 8)  # room for four
        _register(ctl, "small-2", 6)  # room for three
        answers, used = _race([ctl])
        assert answers == ["202"] * 7 + ["409"] * (CREATES - 7)
        assert used == {"small-1": 8, "small-2": 6}
    finally:
        ctl.stop()


def test_two_replicas_fill_hosts_exactly_postgresql(postgres: PostgresServer, tmp_path: Path) -> None:
    db = postgres.database()
    a, b = _controller(tmp_path / "a", db), _controller(tmp_path / "b", db)
    try:
        _register(a, "small-1", 8)
        _register(a, "small-2", 6)
        answers, used = _race([a, b])
        assert answers == ["202"] * 7 + ["409"] * (CREATES - 7)
        assert used == {"small-1": 8, "small-2": 6}
    finally:
        a.stop()
        b.stop()
