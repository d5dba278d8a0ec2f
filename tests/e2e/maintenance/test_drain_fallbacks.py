"""The ladder's other rungs and its failures with real hosts: the in-place update (its pause measured under 1 s),
a destination that stops answering as the move to it starts (the one retry goes elsewhere), a source that dies
mid-drain (reported at once, no hang, never started elsewhere).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
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


def test_destination_stops_answering(tmp_path: Path) -> None:
    # The destination freezes (SIGSTOP, its whole process group) just before the move to it; the controller
    # still counts it Available (a long heartbeat timeout), so it is chosen first (hb before hc by name):
    # the source's move fails, the one retry goes to hc.  Frozen before the move, not during it, so the
    # outcome does not depend on how fast this machine migrates.
    fleet = MaintenanceFleet(tmp_path, heartbeat_timeout=300.0)
    try:
        fleet.start()
        vm = fleet.create_vm("rg1", "mover", image="kvstore", clm="Enabled", host="ha")
        hv = vm["properties"]["instanceView"]["hostVmName"]
        put = fleet.host_api("ha", "POST", f"/v1/vms/{hv}/kv", {"op": "put", "key": "k1", "value": "v1"})
        assert put["status"] == "OK"
        frozen = fleet.fabric.hosts["hb"].process.pid
        os.killpg(frozen, signal.SIGSTOP)
        try:
            _drain(fleet, "ha")
            drain = fleet.wait_drain("ha", timeout=400)
        finally:
            os.killpg(frozen, signal.SIGKILL)
        [row] = drain["vms"]
        assert (row["method"], row["outcome"], row["to"], row["attempts"]) == ("LiveMigration", "Succeeded", "hc", 2)
        failed = [e["data"] for e in fleet.events() if e["type"] == "cvmotion.migration.failed"]
        assert [f["to"] for f in failed] == ["hb"]
        assert fleet.host_api("hc", "GET", f"/v1/vms/{hv}")["state"] == "running"
        got = fleet.host_api("hc", "POST", f"/v1/vms/{hv}/kv", {"op": "get", "key": "k1"})
        assert got == {"status": "OK", "value": "v1"}
        assert "error" in fleet.host_api("ha", "GET", f"/v1/vms/{hv}")
        view = fleet.api("GET", f"{VMS.format(rg='rg1')}/mover").json()["properties"]["instanceView"]
        assert view["host"] == "hc"
    finally:
        fleet.close()


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
