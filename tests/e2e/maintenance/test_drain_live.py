"""A drain of a real host: its opted-in VMs move live (real migrations, real attestation), under load, via the CLI.

The VM's data survives the move, the drain's ``--wait --json`` object is exactly the documented one,
a policy-restricted VM moves only inside its pool, and the events (migration started/completed,
post-migration attestation with the old and new chip and token) are in the controller's outbox.
"""

from __future__ import annotations

import json

import pytest
from conftest import VMS, MaintenanceFleet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

DRAIN_KEYS = {"host", "reason", "status", "vms"}
VM_KEYS = {
    "name", "resourceGroup", "method", "outcome", "from", "to", "downtimeMs", "pauseMs", "attempts", "reason",
}  # fmt: skip


def test_drain_moves_opted_in_vms_live(mfleet: MaintenanceFleet) -> None:
    mfleet.cli("policy", "assignment", "create", "--resource-group", "locked", "--name", "pools",
               "--policy", "allowed-host-pools", "--params", '{"allowedHostPools": ["pool-a"]}')  # fmt: skip
    web = mfleet.create_vm("rg1", "web", image="kvstore", clm="Enabled", host="ha")
    mfleet.create_vm("locked", "pinned", image="kvstore", clm="Enabled", host="ha")
    hv = web["properties"]["instanceView"]["hostVmName"]
    put = mfleet.host_api("ha", "POST", f"/v1/vms/{hv}/kv", {"op": "put", "key": "k1", "value": "v1"})
    assert put["status"] == "OK"
    before = mfleet.wait_attested("ha", hv)

    done = mfleet.cli(
        "host", "drain", "ha", "--controller", mfleet.ctl.url, "--reason", "SecurityUpdate", "--notice", "0",
        "--wait", "--json", timeout=400,
    )  # fmt: skip
    result = json.loads(done.stdout)
    assert set(result) == DRAIN_KEYS
    assert (result["host"], result["reason"], result["status"]) == ("ha", "SecurityUpdate", "Succeeded"), result
    by_name = {vm["name"]: vm for vm in result["vms"]}
    assert all(set(vm) == VM_KEYS for vm in result["vms"])
    moved = by_name["web"]
    assert (moved["method"], moved["outcome"], moved["from"]) == ("LiveMigration", "Succeeded", "ha"), moved
    assert moved["to"] in ("hb", "hc")
    full = mfleet.api("GET", "/providers/Cvmotion.Fabric/hosts/ha/drain").json()
    assert moved["downtimeMs"] is not None, full
    assert moved["downtimeMs"] < 1000
    assert by_name["pinned"]["to"] == "hb", by_name["pinned"]  # its policy's pool only

    # The VM runs on its new host with its data; the controller's record and instance view follow.
    got = mfleet.host_api(moved["to"], "POST", f"/v1/vms/{hv}/kv", {"op": "get", "key": "k1"})
    assert got == {"status": "OK", "value": "v1"}
    view = mfleet.api("GET", f"{VMS.format(rg='rg1')}/web").json()["properties"]["instanceView"]
    assert view["host"] == moved["to"]
    assert view["attestation"]["tokenId"]
    assert view["attestation"]["tokenId"] != before["jti"]
    assert "error" in mfleet.host_api("ha", "GET", f"/v1/vms/{hv}")  # no copy left behind

    events = mfleet.events()
    kinds = [e["type"] for e in events]
    for kind in ("cvmotion.maintenance.scheduled", "cvmotion.maintenance.started", "cvmotion.migration.started",
                 "cvmotion.migration.completed", "cvmotion.vm.postMigrationAttestation",
                 "cvmotion.maintenance.completed"):  # fmt: skip
        assert kind in kinds, kind
    attest = next(e["data"] for e in events if e["type"] == "cvmotion.vm.postMigrationAttestation"
                  and e["data"]["vm"] == "web")  # fmt: skip
    assert attest["old"]["tokenId"] == before["jti"]
    assert attest["old"]["chipId"] != attest["new"]["chipId"]  # another host, another chip
    assert attest["new"]["tokenId"] == view["attestation"]["tokenId"]

    # Cordoned: a VM pinned to ha is refused until it is uncordoned.
    refused = mfleet.cli("vm", "create", "--resource-group", "rg1", "--name", "late", "--size", "Standard_DC2as_v5",
                         "--image", "kvstore", "--host", "ha", expect=1)  # fmt: skip
    assert "cordoned" in refused.stderr
    mfleet.cli("host", "uncordon", "ha")
    assert not next(h for h in mfleet.cli_json("host", "list")["value"] if h["name"] == "ha")["properties"]["cordoned"]
