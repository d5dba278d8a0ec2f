"""Host drains against simulated hosts: the ladder per VM, cordons, refusals, cancel, Scheduled Events, events.

An in-process controller (SQLite, real workers and drain runner, its API on loopback) and three simulated
hosts that implement the maintenance contract (``maintenance_fakes``): h1 and h2 in pool-a, h3 in pool-b.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from control_harness import RG, VMS, Api
from maintenance_fakes import MaintenanceFakeHost
from sqlalchemy import select

from cvmotion.control.api import create_app
from cvmotion.control.db import Event, Vm
from cvmotion.control.maintenance_options import MaintenanceOptions
from cvmotion.control.service import FleetController
from cvmotion.ipc.http import ServerThread, listen_socket

HOSTS = "/providers/Cvmotion.Fabric/hosts"
OPTIONS = MaintenanceOptions(notice_s=0.0, attest_wait_s=0.5, poll_s=0.02, in_place_timeout_s=10.0)


@pytest.fixture
def hosts() -> Iterator[dict[str, MaintenanceFakeHost]]:
    made = {n: MaintenanceFakeHost(n, pool) for n, pool in (("h1", "pool-a"), ("h2", "pool-a"), ("h3", "pool-b"))}
    for h in made.values():
        h.__enter__()
    yield made
    for h in made.values():
        h.__exit__()


@contextlib.contextmanager
def _serve(root: Path, hosts: dict[str, MaintenanceFakeHost], options: MaintenanceOptions) -> Iterator[Api]:
    ctl = FleetController(root / "ctl", heartbeat_timeout=60.0, lease=2.0, workers=4, maintenance=options)
    ctl.start()
    try:
        sock, url = listen_socket("127.0.0.1", 0)
        with ServerThread(create_app(ctl), sock, url), httpx.Client(base_url=url, timeout=30) as client:
            a = Api(client, ctl)
            for host in hosts.values():
                assert a.register(host).status_code == 200
            yield a
    finally:
        ctl.stop()


@pytest.fixture
def api(tmp_path: Path, hosts: dict[str, MaintenanceFakeHost]) -> Iterator[Api]:
    with _serve(tmp_path, hosts, OPTIONS) as a:
        yield a


def _vm(api: Api, rg: str, name: str, clm: str, host: str = "h1") -> None:
    op = api.wait(api.create(rg, name, clm=clm, host=host))
    assert op["status"] == "Succeeded", op


def _drain(api: Api, host: str, reason: str = "SecurityUpdate", **extra: Any) -> httpx.Response:
    response: httpx.Response = api.req("POST", f"{HOSTS}/{host}/drain", {"reason": reason, **extra})
    return response


def _wait_drain(api: Api, host: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        drain: dict[str, Any] = api.req("GET", f"{HOSTS}/{host}/drain").json()
        if not drain["active"]:
            return drain
        api.ctl.drains.wake.set()
        time.sleep(0.02)
    raise AssertionError(f"the drain of {host} did not end: {drain}")


def _events(api: Api) -> list[Event]:
    return api.ctl.transaction(lambda s: list(s.scalars(select(Event).order_by(Event.id))), write=False)


def test_security_update_walks_the_ladder(api: Api, hosts: dict[str, MaintenanceFakeHost]) -> None:
    api.req("PUT", f"{RG}/locked/providers/Microsoft.Authorization/policyAssignments/pools", {
        "properties": {"policyDefinitionId": "allowed-host-pools", "parameters": {"allowedHostPools": ["pool-a"]}}
    })  # fmt: skip
    _vm(api, "rg1", "live", "Enabled")
    _vm(api, "rg1", "off", "Disabled")
    _vm(api, "locked", "pinned", "Enabled")
    started = _drain(api, "h1", noticeSeconds=0)
    assert started.status_code == 202, started.text
    assert started.json()["status"] == "Accepted"
    drain_id = started.json()["id"]
    assert started.headers["Azure-AsyncOperation"].endswith(f"/providers/Cvmotion.Fabric/drains/{drain_id}")
    assert started.headers["Location"] == started.headers["Azure-AsyncOperation"]
    polled = api.req("GET", "/" + started.headers["Location"].split("://", 1)[1].split("/", 1)[1])
    assert polled.status_code == 200, polled.text
    assert polled.json()["id"] == drain_id

    # h1 is never a placement target from now on.
    refused = api.create("rg1", "late", host="h1")
    assert refused.status_code == 409
    assert "cordoned" in refused.text

    drain = _wait_drain(api, "h1")
    assert drain["status"] == "Succeeded", drain
    by_name = {v["name"]: v for v in drain["vms"]}
    assert by_name["live"]["method"] == "LiveMigration"
    assert by_name["live"]["to"] in ("h2", "h3")
    assert by_name["pinned"]["method"] == "LiveMigration"
    assert by_name["pinned"]["to"] == "h2"
    assert by_name["off"]["method"] == "MemoryPreservingUpdate"
    assert by_name["off"]["pauseMs"] == 42.5
    assert "ConfidentialLiveMigrationDisabled" in by_name["off"]["reason"]
    assert all(v["outcome"] == "Succeeded" and v["attempts"] <= 1 for v in drain["vms"])
    assert by_name["live"]["downtimeMs"] == 23
    assert by_name["live"]["bytes"] == 123456
    assert len(hosts["h1"].maintenances) == 1  # one in-place update for the host

    # The records follow: where each VM is, its new token in the instance view.
    shown = api.req("GET", f"{RG}/rg1/{VMS}/live").json()["properties"]["instanceView"]
    assert shown["host"] == by_name["live"]["to"]
    assert shown["attestation"]["tokenId"] == by_name["live"]["attestation"]["after"]["tokenId"]
    assert shown["attestation"]["tokenId"] != by_name["live"]["attestation"]["before"]["tokenId"]

    kinds = [e.type for e in _events(api) if e.type.startswith("cvmotion.")]
    for kind in (
        "cvmotion.maintenance.scheduled", "cvmotion.maintenance.started", "cvmotion.maintenance.completed",
        "cvmotion.migration.started", "cvmotion.migration.completed", "cvmotion.maintenance.fallback",
        "cvmotion.vm.postMigrationAttestation",
    ):  # fmt: skip
        assert kind in kinds, kind
    completed = [e for e in _events(api) if e.type == "cvmotion.migration.completed"]
    assert set(completed[0].data) == {"vm", "from", "to", "totalMs", "downtimeMs", "bytes", "operation"}
    fallback = next(e for e in _events(api) if e.type == "cvmotion.maintenance.fallback")
    assert fallback.data["method"] == "MemoryPreservingUpdate"
    assert fallback.data["pauseMs"] == 42.5
    attest = next(e for e in _events(api) if e.type == "cvmotion.vm.postMigrationAttestation")
    assert set(attest.data) == {"vm", "old", "new"}
    assert attest.data["old"]["chipId"] != attest.data["new"]["chipId"]

    # Each VM's Scheduled Events document moved Scheduled -> Started -> removed, incarnation by incarnation.
    doc = api.req("GET", f"{RG}/rg1/{VMS}/off/scheduledEvents").json()
    assert doc["Events"] == []
    assert doc["DocumentIncarnation"] == 3
    off_puts = [p for p in hosts["h1"].puts if p["vm"].startswith("off-")]
    statuses = [[e["EventStatus"] for e in p["Events"]] for p in off_puts]
    assert statuses[-1] == []
    assert ["Started"] in statuses
    assert [p["DocumentIncarnation"] for p in off_puts] == sorted({p["DocumentIncarnation"] for p in off_puts})

    # Cordoned after the drain, until uncordoned.
    host = next(h for h in api.req("GET", HOSTS).json()["value"] if h["name"] == "h1")
    assert host["properties"]["cordoned"] is True
    assert api.req("POST", f"{HOSTS}/h1/uncordon").json()["properties"]["cordoned"] is False
    assert api.wait(api.create("rg1", "back", host="h1"))["status"] == "Succeeded"


def test_refusals(api: Api) -> None:
    _vm(api, "rg1", "a", "Enabled")
    assert _drain(api, "h1", noticeSeconds=3600).status_code == 202  # runs for an hour
    again = _drain(api, "h1", reason="HardwareRefresh")
    assert again.status_code == 409
    assert "already being drained" in again.json()["error"]["message"]
    assert api.req("POST", f"{HOSTS}/h1/uncordon").status_code == 409  # cancel it first
    assert _drain(api, "h2").status_code == 202  # another host's drain may run beside it (h2 has no VM)
    empty = _wait_drain(api, "h2")
    assert (empty["status"], empty["vms"]) == ("Succeeded", [])
    listed = api.req("GET", "/providers/Cvmotion.Fabric/drains?active=true").json()["value"]
    assert [d["host"] for d in listed] == ["h1"]
    assert api.req("POST", f"{HOSTS}/h1/drain/cancel").status_code == 200
    assert _wait_drain(api, "h1")["status"] == "Canceled"
    assert api.req("POST", f"{HOSTS}/h2/uncordon").status_code == 200
    unknown = _drain(api, "nope")
    assert unknown.status_code == 404
    assert "not registered" in unknown.json()["error"]["message"]
    bad = _drain(api, "h1", reason="Reboot")
    assert bad.status_code == 400
    assert "reason" in bad.json()["error"]["message"]
    assert _drain(api, "h1", maxParallel=0).status_code == 400
    assert api.req("POST", f"{HOSTS}/h1/drain/cancel").status_code == 409  # nothing to cancel
    assert api.req("GET", f"{HOSTS}/h3/drain").status_code == 404
    reader = api.token(__import__("cvmotion.control.auth", fromlist=["Role"]).Role.OWNER, "default")
    assert api.req("POST", f"{HOSTS}/h1/drain", {"reason": "SecurityUpdate"}, token=reader).status_code == 403
    assert api.req("POST", f"{HOSTS}/nope/uncordon").status_code == 404


def test_cordon_keeps_vms_off_a_host_without_moving_any(api: Api, hosts: dict[str, MaintenanceFakeHost]) -> None:
    _vm(api, "rg1", "stays", "Enabled", host="h1")
    cordoned = api.req("POST", f"{HOSTS}/h1/cordon", {"reason": "wave fd0"})
    assert cordoned.status_code == 200, cordoned.text
    assert cordoned.json()["properties"]["cordoned"] is True
    again = api.req("POST", f"{HOSTS}/h1/cordon")  # idempotent; an empty body is a default reason
    assert again.status_code == 200
    assert again.json()["properties"]["cordoned"] is True
    pinned = api.create("rg1", "pinned", host="h1")
    assert pinned.status_code == 409, pinned.text
    assert "cordoned" in pinned.text
    hosts_of = api.ctl.transaction(lambda s: {n: h for n, h in s.execute(select(Vm.name, Vm.host))}, write=False)
    assert hosts_of["stays"] == "h1"  # nothing moved
    assert [e.data["reason"] for e in _events(api) if e.type == "HostCordoned"] == ["wave fd0"]
    assert api.req("POST", f"{HOSTS}/h1/uncordon").json()["properties"]["cordoned"] is False
    assert api.wait(api.create("rg1", "back", host="h1"))["status"] == "Succeeded"
    assert api.req("POST", f"{HOSTS}/nope/cordon").status_code == 404
    assert api.req("POST", f"{HOSTS}/h1/cordon", {"reason": "x", "extra": 1}).status_code == 400
    reader = api.token(__import__("cvmotion.control.auth", fromlist=["Role"]).Role.OWNER, "default")
    assert api.req("POST", f"{HOSTS}/h2/cordon", token=reader).status_code == 403


def test_failed_move_retries_once_then_falls_back(api: Api, hosts: dict[str, MaintenanceFakeHost]) -> None:
    _vm(api, "rg1", "a", "Enabled")
    hosts["h1"].fail_migrations = 1  # the first destination dies mid-migration
    drain = _wait_drain(api, "h1") if _drain(api, "h1", noticeSeconds=0).status_code == 202 else {}
    [vm] = drain["vms"]
    assert (vm["method"], vm["outcome"], vm["attempts"]) == ("LiveMigration", "Succeeded", 2), vm
    failed = [e for e in _events(api) if e.type == "cvmotion.migration.failed"]
    assert len(failed) == 1
    assert set(failed[0].data) == {"vm", "from", "to", "reason"}
    assert failed[0].data["to"] != vm["to"]  # the retry went to another destination

    api.req("POST", f"{HOSTS}/h1/uncordon")
    _vm(api, "rg1", "b", "Enabled")
    hosts["h1"].fail_migrations = 2  # both destinations fail: the fallback of a SecurityUpdate, in place
    assert _drain(api, "h1", noticeSeconds=0).status_code == 202
    drain = _wait_drain(api, "h1")
    [vm] = drain["vms"]
    assert (vm["method"], vm["outcome"], vm["attempts"]) == ("MemoryPreservingUpdate", "Succeeded", 2), vm
    assert vm["reason"].startswith("LiveMigrationFailed")


def test_hardware_refresh_redeploys_or_blocks(api: Api, hosts: dict[str, MaintenanceFakeHost]) -> None:
    api.req("PUT", f"{RG}/locked/providers/Microsoft.Authorization/policyAssignments/pools", {
        "properties": {"policyDefinitionId": "allowed-host-pools", "parameters": {"allowedHostPools": ["pool-b"]}}
    })  # fmt: skip
    _vm(api, "rg1", "off", "Disabled")  # not opted in: redeployed
    _vm(api, "locked", "alone", "Enabled", host="h3")  # pool-b has no other host: blocked
    assert _drain(api, "h1", "HardwareRefresh", noticeSeconds=0).status_code == 202
    assert _drain(api, "h3", "HardwareRefresh", noticeSeconds=0).status_code == 202  # another drain at once
    h1, h3 = _wait_drain(api, "h1"), _wait_drain(api, "h3")
    [off], [alone] = h1["vms"], h3["vms"]
    assert (off["method"], off["outcome"], off["to"]) == ("Redeploy", "Succeeded", "h2"), off
    assert sum(vm.startswith("off-") for h in hosts.values() for vm in h.vms) == 1  # never two copies
    assert (alone["method"], alone["outcome"]) == ("None", "Blocked"), alone
    assert "no redeploy" in alone["reason"]
    assert h3["status"] == "Failed"
    assert any(vm.startswith("alone-") for vm in hosts["h3"].vms)  # it stays


def test_cancel_and_owner_approval(api: Api, hosts: dict[str, MaintenanceFakeHost]) -> None:
    _vm(api, "rg1", "a", "Enabled")
    _vm(api, "rg1", "b", "Enabled")
    _vm(api, "rg1", "c", "Enabled")
    assert _drain(api, "h1", noticeSeconds=3600, maxParallel=1).status_code == 202  # a long notice
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        doc = api.req("GET", f"{RG}/rg1/{VMS}/a/scheduledEvents").json()
        if doc["Events"]:
            break
        time.sleep(0.02)
    [event] = doc["Events"]
    assert (event["EventType"], event["EventStatus"], event["DurationInSeconds"]) == ("Freeze", "Scheduled", 5)
    assert event["NotBefore"].endswith(" GMT")
    bad = api.req("POST", f"{RG}/rg1/{VMS}/a/scheduledEvents", {"StartRequests": [{"EventId": "nope"}]})
    assert bad.status_code == 400
    # The owner approves early: the move starts without waiting an hour.
    approved = api.req("POST", f"{RG}/rg1/{VMS}/a/scheduledEvents", {"StartRequests": [{"EventId": event["EventId"]}]})
    assert approved.status_code == 200, approved.text
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        vms = {v["name"]: v for v in api.req("GET", f"{HOSTS}/h1/drain").json()["vms"]}
        if vms["a"]["outcome"] == "Succeeded":
            break
        time.sleep(0.02)
    assert vms["a"]["outcome"] == "Succeeded"
    canceled = api.req("POST", f"{HOSTS}/h1/drain/cancel")
    assert canceled.status_code == 200
    assert canceled.json()["status"] == "Canceling"
    drain = _wait_drain(api, "h1")
    assert drain["status"] == "Canceled"
    rest = [v for v in drain["vms"] if v["name"] != "a"]
    assert all(v["outcome"] == "Blocked" and v["reason"].startswith("Canceled") for v in rest), rest
    assert api.req("GET", f"{RG}/rg1/{VMS}/b/scheduledEvents").json()["Events"] == []
    assert sum(vm.startswith(("b-", "c-")) for vm in hosts["h1"].vms) == 2  # they stayed
    assert api.req("POST", f"{HOSTS}/h1/uncordon").status_code == 200


def test_source_host_dies_mid_drain(api: Api, hosts: dict[str, MaintenanceFakeHost]) -> None:
    from cvmotion.control.auth import Role

    _vm(api, "rg1", "a", "Enabled")
    _vm(api, "rg1", "b", "Disabled")
    assert _drain(api, "h1", noticeSeconds=3600).status_code == 202  # both wait for their notice
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        steps = {v["name"]: v["step"] for v in api.req("GET", f"{HOSTS}/h1/drain").json()["vms"]}
        if steps == {"a": "LiveScheduled", "b": "InPlaceWaiting"}:
            break
        time.sleep(0.02)
    assert steps == {"a": "LiveScheduled", "b": "InPlaceWaiting"}
    hosts["h1"].server.close()  # the host is gone; the others keep heartbeating
    api.ctl.transaction(lambda s: api.ctl.inventory.sweep(s, now=time.time() + 3600))
    host_token = api.token(Role.HOST)
    for name in ("h2", "h3"):
        beat = api.req("POST", f"{HOSTS}/{name}/heartbeat", {"vms": sorted(hosts[name].vms)}, token=host_token)
        assert beat.status_code == 200
    drain = _wait_drain(api, "h1")  # no hang: reported at once, not after the hour's notice
    assert drain["status"] == "Failed"
    for vm in drain["vms"]:
        assert (vm["outcome"], vm["to"]) == ("Failed", None), vm
        assert vm["reason"].startswith("SourceUnavailable"), vm
        shown = api.req("GET", f"{RG}/rg1/{VMS}/{vm['name']}").json()["properties"]["instanceView"]
        assert shown["host"] == "h1"  # left where it is: never started elsewhere
    assert not any(vm.startswith(("a-", "b-")) for h in ("h2", "h3") for vm in hosts[h].vms)


def test_maintenance_window_drains_its_hosts_in_order(api: Api) -> None:
    windows = "/providers/Cvmotion.Fabric/maintenanceWindows"
    _vm(api, "rg1", "a", "Enabled", host="h1")
    _vm(api, "rg1", "b", "Enabled", host="h2")
    body = {"hosts": ["h1", "h2"], "start": "now", "duration": "PT1H", "reason": "SecurityUpdate", "noticeSeconds": 0}
    assert api.req("PUT", f"{windows}/w1", body | {"hosts": ["h1", "nope"]}).status_code == 404
    assert api.req("PUT", f"{windows}/w1", body | {"duration": "PT0S"}).status_code == 400
    assert api.req("PUT", f"{windows}/w1", body | {"start": "tomorrow"}).status_code == 400
    created = api.req("PUT", f"{windows}/w1", body)
    assert created.status_code == 201, created.text
    assert api.req("PUT", f"{windows}/w1", body).status_code == 409
    later = api.req("PUT", f"{windows}/later", body | {"start": "+2h"}).json()
    assert later["status"] == "Scheduled"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        window = api.req("GET", f"{windows}/w1").json()
        if window["status"] not in ("Scheduled", "Running"):
            break
        time.sleep(0.05)
    assert window["status"] == "Completed", window
    first, second = (api.req("GET", f"/providers/Cvmotion.Fabric/drains/{d}").json() for d in window["drains"])
    assert (first["host"], second["host"]) == ("h1", "h2")
    assert first["endedAt"] <= second["createdAt"]  # one host after the other
    assert second["status"] == "Succeeded"
    assert {v["to"] for v in second["vms"]} == {"h3"}  # h1 stays cordoned after its drain: never a target
    assert api.req("DELETE", f"{windows}/later").json()["status"] == "Canceled"
    assert api.req("GET", f"{windows}/later").status_code == 404
    assert api.req("PUT", f"{windows}/later", body | {"start": "+2h"}).status_code == 201  # the name is free again


def _in_flight(api: Api) -> dict[str, int]:
    """Per source host, the VMs whose live move holds a slot (Freeze scheduled or moving)."""
    counts: dict[str, int] = {}
    for drain in api.req("GET", "/providers/Cvmotion.Fabric/drains?active=true").json()["value"]:
        held = sum(v["step"] in ("LiveScheduled", "LiveMigrating") for v in drain["vms"])
        counts[drain["host"]] = counts.get(drain["host"], 0) + held
    return counts


def test_concurrency_limits(tmp_path: Path, hosts: dict[str, MaintenanceFakeHost]) -> None:
    with _serve(tmp_path, hosts, dataclasses.replace(OPTIONS, cluster_limit=3)) as api:
        for name in ("a1", "a2", "a3"):
            _vm(api, "rg1", name, "Enabled", host="h1")
        for name in ("b1", "b2", "b3"):
            _vm(api, "rg1", name, "Enabled", host="h2")
        hosts["h1"].gate.clear()  # moves stay under way until released
        hosts["h2"].gate.clear()
        assert _drain(api, "h1", maxParallel=2, noticeSeconds=0).status_code == 202
        assert _drain(api, "h2", maxParallel=2, noticeSeconds=0).status_code == 202
        deadline = time.monotonic() + 15
        peak: dict[str, int] = {}
        while time.monotonic() < deadline:
            counts = _in_flight(api)
            for host, held in counts.items():
                peak[host] = max(peak.get(host, 0), held)
            assert sum(counts.values()) <= 3, counts  # the fleet's limit
            assert all(n <= 2 for n in counts.values()), counts  # each host's outbound limit
            if len(hosts["h1"].pending) + len(hosts["h2"].pending) == 3:
                break
            time.sleep(0.02)
        assert len(hosts["h1"].pending) + len(hosts["h2"].pending) == 3  # the slots filled, and no more
        assert max(peak.values()) == 2
        hosts["h1"].gate.set()
        hosts["h2"].gate.set()
        for host in ("h1", "h2"):
            drain = _wait_drain(api, host)
            assert drain["status"] == "Succeeded", drain
            assert {v["to"] for v in drain["vms"]} == {"h3"}  # the other host is cordoned too


def test_completion_timeout_cancels_and_falls_back(tmp_path: Path, hosts: dict[str, MaintenanceFakeHost]) -> None:
    quick = dataclasses.replace(OPTIONS, completion_base_s=0.5, completion_per_gib_s=0.0)
    with _serve(tmp_path, hosts, quick) as api:
        _vm(api, "rg1", "slow", "Enabled", host="h1")
        hosts["h1"].gate.clear()  # the move never converges
        assert _drain(api, "h1", noticeSeconds=0).status_code == 202
        drain = _wait_drain(api, "h1")
        [vm] = drain["vms"]
        assert (vm["method"], vm["outcome"], vm["attempts"]) == ("MemoryPreservingUpdate", "Succeeded", 2), vm
        assert len(hosts["h1"].cancels) == 2  # each attempt cancelled at its deadline
        assert "cancelled" in vm["reason"]
        assert any(v.startswith("slow-") for v in hosts["h1"].vms)  # it stayed, paused in place


def test_guest_approves_early_through_its_host(api: Api, hosts: dict[str, MaintenanceFakeHost]) -> None:
    _vm(api, "rg1", "g", "Enabled")
    assert _drain(api, "h1", noticeSeconds=3600).status_code == 202
    deadline = time.monotonic() + 10
    published: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not published:
        published = [p for p in hosts["h1"].puts if p["vm"].startswith("g-") and p["Events"]]
        time.sleep(0.02)
    [event] = published[0]["Events"]  # the guest reads it from its host ...
    assert (event["EventType"], event["EventStatus"], event["Resources"]) == (
        "Freeze",
        "Scheduled",
        [published[0]["vm"]],
    )
    hosts["h1"].start_requests[published[0]["vm"]] = [event["EventId"]]  # ... and approves it there
    drain = _wait_drain(api, "h1")  # without waiting the hour
    assert drain["vms"][0]["outcome"] == "Succeeded"
    assert drain["vms"][0]["scheduledEventId"] == event["EventId"]
