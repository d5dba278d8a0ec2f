"""A controller SIGKILLed at every step of every operation, then restarted, settles each operation:
no VM lost, none on two hosts, none created twice — on SQLite and on PostgreSQL.

The hosts are simulated (the host API contract, in this process) so a host's answer can be observed
exactly; the kill is a real SIGKILL of a real ``cvmotion controller serve`` at an injected point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from cvmotion.testing.controller import ControllerProcess
from cvmotion.testing.fakehost import FakeHost

VM = "/subscriptions/default/resourceGroups/rg1/providers/Microsoft.Compute/virtualMachines/web"
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


def _copies(hosts: dict[str, FakeHost]) -> dict[str, list[str]]:
    return {name: [vm for vm in h.vms if vm.startswith("web-")] for name, h in hosts.items()}


def _request(ctl: ControllerProcess, kind: str) -> Any:
    if kind == "Create":
        return ctl.api("PUT", VM, BODY)
    if kind == "Delete":
        return ctl.api("DELETE", VM)
    return ctl.api("POST", VM + "/migrate", {"targetHost": "h2"})


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_at_every_step(point: str, db_url: str | None, tmp_path: Path, fakehosts: dict[str, FakeHost]) -> None:
    kind = point.split(":")[0]
    fault = tmp_path / "kill-at"
    ctl = ControllerProcess(tmp_path / "ctl", db_url, env={"CVMOTION_FAULT_KILL_FILE": str(fault)})
    ctl.start()
    try:
        for host in fakehosts.values():
            assert ctl.api("POST", "/providers/Cvmotion.Fabric/hosts/register", host.registration()).status_code == 200
        if kind != "Create":
            created = ctl.api("PUT", VM, BODY)
            assert ctl.wait_operation(created.headers["Azure-AsyncOperation"])["status"] == "Succeeded"

        fault.write_text(point)
        try:
            response = _request(ctl, kind)
            assert response.status_code == 202, response.text
        except httpx.TransportError:
            pass  # the worker reached the point (and died) before the answer left: the operation is durable
        assert ctl.wait_exit() == -9  # killed itself at the point, after that step committed
        assert not fault.exists()

        ctl.start()
        [latest, *_] = ctl.api("GET", VM + "/operations").json()["value"]
        assert latest["name"] == kind
        op = ctl.wait_operation(f"/subscriptions/default/providers/Cvmotion.Fabric/operations/{latest['id']}")
        assert op["status"] == "Succeeded", op
        copies = _copies(fakehosts)
        vm = ctl.api("GET", VM)
        if kind == "Delete":
            assert vm.status_code == 404
            assert copies == {"h1": [], "h2": []}
            return
        where = vm.json()["properties"]["instanceView"]["host"]
        assert where == ("h1" if kind == "Create" else "h2")
        assert sum(len(c) for c in copies.values()) == 1, copies  # exactly one instance, nowhere else
        assert len(copies[where]) == 1
        assert vm.json()["properties"]["provisioningState"] == "Succeeded"
    finally:
        ctl.kill()
