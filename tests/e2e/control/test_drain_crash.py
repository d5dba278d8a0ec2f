"""A controller SIGKILLed at every step of a drain, then restarted: the drain continues and ends, nothing lost or
duplicated — on SQLite and on PostgreSQL.

A real ``cvmotion controller serve`` process; simulated hosts in this process (the maintenance contract:
``tests/unit/control/maintenance_fakes.py``) so every host's state can be checked exactly.  Each round puts
one opted-in VM and one that is not on h1, arms one kill point (right after a ladder step commits, or right
after a host answered and before the controller recorded it) and drains h1; the controller kills itself
there, is restarted, and the drain must end Succeeded: the first VM once on another host, the second still on
h1 after exactly one in-place update, one ``migration.completed`` and one ``maintenance.completed``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from cvmotion.testing.controller import ControllerProcess

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "unit" / "control"))  # the shared fake host
from maintenance_fakes import MaintenanceFakeHost  # noqa: E402

pytestmark = pytest.mark.timeout(600)

HOSTS = "/providers/Cvmotion.Fabric/hosts"
VMS = "/subscriptions/default/resourceGroups/rg1/providers/Microsoft.Compute/virtualMachines"
SECURITY_POINTS = [
    "Drain:LiveScheduled",  # Freeze scheduled and committed; nothing asked yet
    "Drain:LiveMigrating",  # the Migrate operation recorded; the worker has not run it
    "Migrate:HostAnswered",  # the source started the migration; the controller has not recorded its id
    "Drain:InPlaceWaiting",
    "Drain:InPlaceScheduled",
    "Drain:InPlaceRunning",  # the step committed; the host not asked
    "Drain:InPlaceAnswered",  # the host accepted the update; its answer not recorded
    "Drain:InPlaceSettled",
    "Drain:Done",
    "Drain:Completed",
]
REDEPLOY_POINTS = ["Drain:RedeployStopping", "Drain:RedeployStopAnswered", "Drain:RedeployStarting",
                   "Drain:RedeployStartAnswered"]  # fmt: skip


def _body(clm: str) -> dict[str, Any]:
    return {
        "properties": {
            "hardwareProfile": {"vmSize": "Standard_DC2as_v5"},
            "securityProfile": {"confidentialLiveMigration": clm},
            "storageProfile": {"imageReference": {"id": "kvstore"}},
            "placement": {"host": "h1"},
        }
    }


def _copies(hosts: dict[str, MaintenanceFakeHost], name: str) -> dict[str, int]:
    return {h: sum(vm.startswith(f"{name}-") for vm in fake.vms) for h, fake in hosts.items()}


def _wait_drain(ctl: ControllerProcess, timeout: float = 90.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    drain: dict[str, Any] = {}
    while time.monotonic() < deadline:
        drain = ctl.api("GET", f"{HOSTS}/h1/drain").json()
        if drain.get("active") is False:
            return drain
        time.sleep(0.1)
    raise AssertionError(f"the drain did not end after the restart: {drain}")


def _round(ctl: ControllerProcess, fault: Path, point: str, names: list[tuple[str, str]], reason: str) -> None:
    assert ctl.api("POST", f"{HOSTS}/h1/uncordon").status_code == 200
    for name, clm in names:
        created = ctl.api("PUT", f"{VMS}/{name}", _body(clm))
        assert ctl.wait_operation(created.headers["Azure-AsyncOperation"])["status"] == "Succeeded", point
    fault.write_text(point)
    try:
        response = ctl.api("POST", f"{HOSTS}/h1/drain", {"reason": reason, "noticeSeconds": 0})
        assert response.status_code == 202, (point, response.text)
    except httpx.TransportError:
        pass  # the runner reached the point before the answer left: the drain is durable
    assert ctl.wait_exit(60) == -9, point
    assert not fault.exists(), point
    ctl.start()


@pytest.mark.slow
def test_sigkill_at_every_drain_step(db_url: str | None, tmp_path: Path) -> None:
    hosts = {n: MaintenanceFakeHost(n, p) for n, p in (("h1", "pool-a"), ("h2", "pool-a"), ("h3", "pool-a"))}
    for h in hosts.values():
        h.__enter__()
    fault = tmp_path / "kill-at"
    ctl = ControllerProcess(tmp_path / "ctl", db_url, env={"CVMOTION_FAULT_KILL_FILE": str(fault)})
    ctl.start()
    try:
        for host in hosts.values():
            assert ctl.api("POST", f"{HOSTS}/register", host.registration()).status_code == 200
        for index, point in enumerate(SECURITY_POINTS):
            live, stay = f"live{index}", f"stay{index}"
            _round(ctl, fault, point, [(live, "Enabled"), (stay, "Disabled")], "SecurityUpdate")
            drain = _wait_drain(ctl)
            assert drain["status"] == "Succeeded", (point, drain)
            by_name = {v["name"]: v for v in drain["vms"]}
            assert by_name[live]["method"] == "LiveMigration", (point, by_name)
            assert by_name[stay]["method"] == "MemoryPreservingUpdate", (point, by_name)
            moved = _copies(hosts, live)
            assert moved["h1"] == 0, (point, moved)
            assert sum(moved.values()) == 1, (point, moved)  # one instance, off h1
            assert _copies(hosts, stay) == {"h1": 1, "h2": 0, "h3": 0}, point
            assert ctl.api("GET", f"{VMS}/{live}").json()["properties"]["instanceView"]["host"] == by_name[live]["to"]
            ids = {m for m in hosts["h1"].maintenances if drain["id"] in m}
            assert len(ids) == 1, (point, hosts["h1"].maintenances)  # one in-place update, asked again by id
            events = ctl.api("GET", "/providers/Cvmotion.Fabric/events?limit=1000").json()["value"]
            mine = [e for e in events if e.get("data", {}).get("drain") == drain["id"] or
                    e.get("data", {}).get("vm") in (live, stay)]  # fmt: skip
            kinds = [e["type"] for e in mine]
            assert kinds.count("cvmotion.migration.completed") == 1, (point, kinds)
            assert kinds.count("cvmotion.maintenance.completed") == 1, (point, kinds)
            assert kinds.count("cvmotion.maintenance.fallback") == 1, (point, kinds)
        for index, point in enumerate(REDEPLOY_POINTS):
            name = f"redeploy{index}"
            _round(ctl, fault, point, [(name, "Disabled")], "HardwareRefresh")
            drain = _wait_drain(ctl)
            assert drain["status"] == "Succeeded", (point, drain)
            for vm in drain["vms"]:  # this round's VM and those the in-place rounds left on h1
                assert vm["method"] == "Redeploy", (point, vm)
                copies = _copies(hosts, vm["name"])
                assert copies["h1"] == 0, (point, copies)
                assert sum(copies.values()) == 1, (point, copies)  # never two
    finally:
        ctl.kill()
        for h in hosts.values():
            h.__exit__()
