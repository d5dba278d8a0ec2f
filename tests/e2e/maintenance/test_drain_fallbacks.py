"""The ladder's other rungs and its failures with real hosts: the in-place update (its pause measured under 1 s),
a destination that dies mid-migration (the retry goes elsewhere), a source that dies mid-drain (reported, no hang).
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from conftest import HOSTS, VMS, MaintenanceFleet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _serves_in_place_updates(fleet: MaintenanceFleet, host: str) -> bool:
    spec = httpx.get(fleet.fabric.hosts[host].url + "/openapi.json", timeout=30).json()
    return "/v1/host/maintenance" in spec.get("paths", {})


def _drain(fleet: MaintenanceFleet, host: str, **body: Any) -> None:
    response = fleet.api("POST", f"{HOSTS}/{host}/drain", {"reason": "SecurityUpdate", "noticeSeconds": 0, **body})
    assert response.status_code == 202, response.text


def test_in_place_update_pauses_under_a_second(mfleet: MaintenanceFleet) -> None:
    if not _serves_in_place_updates(mfleet, "ha"):
        pytest.skip("the host daemon does not serve POST /v1/host/maintenance (the host side is not in this tree)")
    vm = mfleet.create_vm("rg1", "busy", image="memdirty", clm="Disabled", host="ha")
    hv = vm["properties"]["instanceView"]["hostVmName"]
    before = mfleet.wait_attested("ha", hv)
    _drain(mfleet, "ha")
    drain = mfleet.wait_drain("ha")
    [row] = drain["vms"]
    assert (drain["status"], row["method"], row["outcome"]) == ("Succeeded", "MemoryPreservingUpdate", "Succeeded")
    assert 0 < row["pauseMs"] < 1000, row  # measured by the host from the vCPUs stopping to their running again
    assert mfleet.host_api("ha", "GET", f"/v1/vms/{hv}")["state"] == "running"  # the same VM, same host
    fallback = next(e["data"] for e in mfleet.events() if e["type"] == "cvmotion.maintenance.fallback")
    assert fallback == {"vm": "busy", "from": "ha", "reason": row["reason"], "method": "MemoryPreservingUpdate",
                        "pauseMs": row["pauseMs"]}  # fmt: skip
    after = mfleet.wait_attested("ha", hv)
    assert after["chip_id"] == before["chip_id"]


def test_destination_dies_mid_migration(mfleet: MaintenanceFleet) -> None:
    vm = mfleet.create_vm("rg1", "mover", image="memdirty", clm="Enabled", host="ha")
    hv = vm["properties"]["instanceView"]["hostVmName"]
    _drain(mfleet, "ha")
    deadline = time.monotonic() + 120
    first: dict[str, Any] = {}
    while time.monotonic() < deadline:  # the first move is under way: its destination dies
        [first] = mfleet.api("GET", f"{HOSTS}/ha/drain").json()["vms"]
        if first["step"] == "LiveMigrating" and (first.get("progress") or {}).get("status") == "active":
            break
        time.sleep(0.05)
    if first.get("step") != "LiveMigrating":
        pytest.fail(f"the move never got under way: {first}")
    target = first["to"]
    mfleet.fabric.hosts[target].process.kill()
    drain = mfleet.wait_drain("ha")
    [row] = drain["vms"]
    failed = [e["data"] for e in mfleet.events() if e["type"] == "cvmotion.migration.failed"]
    if row["attempts"] == 1:
        pytest.skip(f"the move completed before {target} died ({row})")  # the machine was faster than the kill
    assert failed
    assert failed[0]["to"] == target
    other = ({"hb", "hc"} - {target}).pop()
    assert (row["method"], row["outcome"], row["to"], row["attempts"]) == ("LiveMigration", "Succeeded", other, 2)
    assert mfleet.host_api(other, "GET", f"/v1/vms/{hv}")["state"] == "running"
    assert "error" in mfleet.host_api("ha", "GET", f"/v1/vms/{hv}")
    view = mfleet.api("GET", f"{VMS.format(rg='rg1')}/mover").json()["properties"]["instanceView"]
    assert view["host"] == other


def test_source_dies_mid_drain(mfleet: MaintenanceFleet) -> None:
    vm = mfleet.create_vm("rg1", "left", image="kvstore", clm="Enabled", host="ha")
    _drain(mfleet, "ha", noticeSeconds=3600)  # waits for its notice ...
    mfleet.fabric.hosts["ha"].process.kill()  # ... while its host dies
    mfleet.wait_hosts({"ha": "Unavailable"}, timeout=30)
    drain = mfleet.wait_drain("ha", timeout=60)  # reported, no hang
    [row] = drain["vms"]
    assert (drain["status"], row["outcome"], row["to"]) == ("Failed", "Failed", None), drain
    assert row["reason"].startswith("SourceUnavailable")
    hv = vm["properties"]["instanceView"]["hostVmName"]
    for other in ("hb", "hc"):
        assert "error" in mfleet.host_api(other, "GET", f"/v1/vms/{hv}")  # never started elsewhere
    assert mfleet.api("GET", f"{VMS.format(rg='rg1')}/left").json()["properties"]["instanceView"]["host"] == "ha"
