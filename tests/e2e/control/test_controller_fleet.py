"""The fleet controller end to end: a real controller process, real host daemons (KVM guests) that register
and heartbeat, and the ``cvmotion`` CLI — placement, opt-in live migration, organisation policy enforced by
the controller and (with the controller bypassed, as if compromised) by the migration agents themselves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cvmotion.host.fabric import LocalFabric
from cvmotion.testing.controller import ControllerProcess
from cvmotion.vmm.kvm import kvm_usable

pytestmark = pytest.mark.timeout(600)


class Fleet:
    def __init__(self, root: Path) -> None:
        self.ctl = ControllerProcess(root / "ctl", heartbeat_timeout=3.0)
        self.fabric = LocalFabric(root / "fabric")
        self.env = dict(os.environ, CVMOTION_HOME=str(self.ctl.data_dir / "home"), CVMOTION_CONTROLLER=self.ctl.url)

    def cli(self, *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "cvmotion", *args], env=self.env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == expect, f"{args}: {done.returncode} {done.stdout[-2000:]} {done.stderr[-2000:]}"
        return done

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def wait_hosts(self, want: dict[str, str], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hosts = {h["name"]: h["properties"]["state"] for h in self.cli_json("host", "list")["value"]}
            if all(hosts.get(name) == state for name, state in want.items()):
                return
            time.sleep(0.2)
        raise AssertionError(f"hosts did not reach {want}: {hosts}")


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    if not kvm_usable()[0]:
        pytest.skip("/dev/kvm is not usable here")
    f = Fleet(tmp_path)
    f.ctl.start()
    try:
        token = f.cli_json("controller", "token", "create", "--data-dir", str(f.ctl.data_dir), "--role", "Host")
        extra = ["--controller", f.ctl.url, "--controller-token", token["token"], "--no-standby"]
        for name, pool in (("ha", "pool-a"), ("hb", "pool-a"), ("hc", "pool-b")):
            f.fabric.start_host(name, pool=pool, extra=extra)
        yield f
    finally:
        f.fabric.close()
        f.ctl.kill()


def _host_api(fleet: Fleet, host: str, method: str, path: str, body: Any = None) -> Any:
    response = httpx.request(method, fleet.fabric.hosts[host].url + path, json=body, timeout=60)
    return response.json()


def _wait_migration(fleet: Fleet, host: str, mig_id: str, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status: dict[str, Any] = _host_api(fleet, host, "GET", f"/v1/migrations/{mig_id}")
        if status["status"] in ("completed", "failed", "cancelled"):
            return status
        time.sleep(0.1)
    raise AssertionError(f"migration {mig_id} did not settle")


def test_fleet_through_the_cli(fleet: Fleet, tmp_path: Path) -> None:
    fleet.wait_hosts({"ha": "Available", "hb": "Available", "hc": "Available"})
    rg = ("--resource-group", "rg1")
    fleet.cli("policy", "assignment", "create", *rg, "--name", "pools", "--policy", "allowed-host-pools",
              "--params", '{"allowedHostPools": ["pool-a"]}')  # fmt: skip

    created = fleet.cli(
        "vm", "create", *rg, "--name", "web", "--size", "Standard_DC2as_v5", "--image", "kvstore",
        "--confidential-live-migration", "Enabled", "--host", "ha", "--json",
    )  # fmt: skip
    assert "using the controller's local Owner token" in created.stderr
    vm = json.loads(created.stdout)
    view = vm["properties"]["instanceView"]
    assert vm["properties"]["provisioningState"] == "Succeeded"
    assert (view["host"], view["powerState"], view["allowedHostPools"]) == ("ha", "running", ["pool-a"])
    assert view["liveMigration"] == {"eligible": True, "reasons": []}
    hv = view["hostVmName"]
    assert _host_api(fleet, "ha", "GET", f"/v1/vms/{hv}")["state"] == "running"
    put = _host_api(fleet, "ha", "POST", f"/v1/vms/{hv}/kv", {"op": "put", "key": "k1", "value": "v1"})
    assert put["status"] == "OK"

    # The controller refuses a destination outside the allowed pools, naming the assignment.
    refused = fleet.cli("vm", "migrate", "web", *rg, "--to-host", "hc", expect=5)
    assert "RequestDisallowedByPolicy" in refused.stderr
    assert "'pools'" in refused.stderr
    # A compromised controller asks the host directly: the migration agents refuse pool-b themselves.
    started = _host_api(fleet, "ha", "POST", f"/v1/vms/{hv}/migrate", {"destination": fleet.fabric.hosts["hc"].url})
    if "migration" in started:
        outcome = _wait_migration(fleet, "ha", started["migration"])
        assert outcome["status"] == "failed"
        assert "pool" in outcome.get("error-desc", "").lower()
    else:
        assert "pool" in json.dumps(started).lower()
    assert _host_api(fleet, "ha", "GET", f"/v1/vms/{hv}")["state"] == "running"
    assert "error" in _host_api(fleet, "hc", "GET", f"/v1/vms/{hv}")

    # Operator-driven live migration inside the allowed pool: the VM and its data move.
    moved = fleet.cli_json("vm", "migrate", "web", *rg, "--to-host", "hb")
    assert moved["operation"]["status"] == "Succeeded"
    assert moved["vm"]["properties"]["instanceView"]["host"] == "hb"
    got = _host_api(fleet, "hb", "POST", f"/v1/vms/{hv}/kv", {"op": "get", "key": "k1"})
    assert got == {"status": "OK", "value": "v1"}

    # Not opted in: refused with the reason.
    fleet.cli("vm", "create", *rg, "--name", "off", "--size", "Standard_DC2as_v5", "--image", "memdirty")
    not_opted = fleet.cli("vm", "migrate", "off", *rg, expect=1)
    assert "ConfidentialLiveMigrationDisabled" in not_opted.stderr

    # A deny assignment made after launch is honoured for the existing VM.
    fleet.cli("policy", "assignment", "create", *rg, "--name", "no-clm", "--policy", "deny-confidential-live-migration")
    assert "no-clm" in fleet.cli("vm", "migrate", "web", *rg, expect=5).stderr
    shown = fleet.cli_json("vm", "show", *rg, "--name", "web")
    assert shown["properties"]["instanceView"]["liveMigration"]["eligible"] is False
    fleet.cli("vm", "update", *rg, "--name", "off", "--confidential-live-migration", "Enabled", expect=5)
    listed = fleet.cli_json("vm", "list", *rg)
    assert sorted(v["name"] for v in listed["value"]) == ["off", "web"]

    # A template deployment (opted in, in a group without the deny) lands on an allowed host.
    template = tmp_path / "vm.json"
    template.write_text(json.dumps(TEMPLATE))
    fleet.cli("deployment", "create", "--resource-group", "rg2", "--template-file", str(template),
              "--parameters", "vmName=tpl")  # fmt: skip
    deployed = fleet.cli_json("vm", "show", "--resource-group", "rg2", "--name", "tpl")
    assert deployed["properties"]["securityProfile"]["confidentialLiveMigration"] == "Enabled"
    assert deployed["properties"]["provisioningState"] == "Succeeded"

    # Delete, and delete again.
    fleet.cli("vm", "delete", *rg, "--name", "web")
    assert "error" in _host_api(fleet, "hb", "GET", f"/v1/vms/{hv}")
    assert "does not exist" in fleet.cli("vm", "delete", *rg, "--name", "web", expect=1).stderr

    # A host that stops heartbeating becomes Unavailable.
    fleet.fabric.hosts["hc"].process.kill()
    fleet.wait_hosts({"hc": "Unavailable", "ha": "Available"}, timeout=30)


TEMPLATE = {
    "$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
    "contentVersion": "1.0.0.0",
    "parameters": {"vmName": {"type": "string"}, "size": {"type": "string", "defaultValue": "Standard_DC2as_v5"}},
    "resources": [
        {
            "type": "Microsoft.Compute/virtualMachines",
            "apiVersion": "2024-03-01",
            "name": "[parameters('vmName')]",
            "location": "[resourceGroup().location]",
            "properties": {
                "hardwareProfile": {"vmSize": "[parameters('size')]"},
                "securityProfile": {"securityType": "ConfidentialVM", "confidentialLiveMigration": "Enabled"},
                "storageProfile": {"imageReference": {"id": "kvstore"}},
            },
        }
    ],
}
