"""A controller SIGKILLed at every step of every operation, then restarted, settles each operation:
no VM lost, none on two hosts, none created twice — on SQLite and on PostgreSQL.

The hosts are simulated (the host API contract, in this process) so a host's state can be checked
exactly; the kill is a real SIGKILL of a real ``cvmotion controller serve`` at an injected point (right
after a step commits, or right after the host answered and before the controller recorded it).  One
controller data directory serves every point in turn: each point is one kill and one restart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from cvmotion.testing.controller import ControllerProcess
from cvmotion.testing.fakehost import FakeHost

VMS = "/subscriptions/default/resourceGroups/rg1/providers/Microsoft.Compute/virtualMachines"
OPERATIONS = "/subscriptions/default/providers/Cvmotion.Fabric/operations"
BODY = {
    "properties": {
        "hardwareProfile": {"vmSize": "Standard_DC2as_v5"},
        "securityProfile": {"confidentialLiveMigration": "Enabled"},
        "storageProfile": {"imageReference": {"id": "kvstore"}},
        "placement": {"host": "h1"},
    }
}
POINTS = [
    "Create:HostRequested",
    "Create:HostAnswered",
    "Delete:HostRequested",
    "Delete:HostAnswered",
    "Migrate:HostRequested",
    "Migrate:HostAnswered",
    "Migrate:Migrating",
]


def _copies(hosts: dict[str, FakeHost], name: str) -> dict[str, int]:
    return {h: sum(vm.startswith(f"{name}-") for vm in fake.vms) for h, fake in hosts.items()}


def _request(ctl: ControllerProcess, kind: str, vm: str) -> Any:
    if kind == "Create":
        return ctl.api("PUT", vm, BODY)
    if kind == "Delete":
        return ctl.api("DELETE", vm)
    return ctl.api("POST", vm + "/migrate", {"targetHost": "h2"})


def test_sigkill_at_every_step(db_url: str | None, tmp_path: Path, fakehosts: dict[str, FakeHost]) -> None:
    fault = tmp_path / "kill-at"
    ctl = ControllerProcess(tmp_path / "ctl", db_url, env={"CVMOTION_FAULT_KILL_FILE": str(fault)})
    ctl.start()
    try:
        for host in fakehosts.values():
            assert ctl.api("POST", "/providers/Cvmotion.Fabric/hosts/register", host.registration()).status_code == 200
        for index, point in enumerate(POINTS):
            kind, name = point.split(":")[0], f"vm{index}"
            vm = f"{VMS}/{name}"
            if kind != "Create":
                created = ctl.api("PUT", vm, BODY)
                assert ctl.wait_operation(created.headers["Azure-AsyncOperation"])["status"] == "Succeeded", point

            fault.write_text(point)
            try:
                response = _request(ctl, kind, vm)
                assert response.status_code == 202, (point, response.text)
            except httpx.TransportError:
                pass  # the worker reached the point (and died) before the answer left: the operation is durable
            assert ctl.wait_exit() == -9, point  # killed itself right at the point
            assert not fault.exists(), point

            ctl.start()
            [latest, *_] = ctl.api("GET", f"{vm}/operations").json()["value"]
            assert latest["name"] == kind, point
            op = ctl.wait_operation(f"{OPERATIONS}/{latest['id']}")
            assert op["status"] == "Succeeded", (point, op)
            copies = _copies(fakehosts, name)
            shown = ctl.api("GET", vm)
            if kind == "Delete":
                assert shown.status_code == 404, point
                assert copies == {"h1": 0, "h2": 0}, point
                continue
            where = shown.json()["properties"]["instanceView"]["host"]
            assert where == ("h1" if kind == "Create" else "h2"), point
            assert copies == {where: 1, ({"h1", "h2"} - {where}).pop(): 0}, (point, copies)  # one instance
            assert shown.json()["properties"]["provisioningState"] == "Succeeded", point
    finally:
        ctl.kill()
