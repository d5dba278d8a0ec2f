"""Simulated hosts: the host API subset the controller uses, in virtual time, telling the ground truth."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from cvmotion.ipc.http import listen_socket
from cvmotion.sim.clock import VirtualClock
from cvmotion.sim.distributions import INPLACE_PAUSE_MS_RANGE, Workload
from cvmotion.sim.hostapi import create_app
from cvmotion.sim.hosts import SimFleet, SimHost
from cvmotion.sim.ledger import Intent, Method


class Wall:
    """A wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


World = tuple[SimFleet, Wall, httpx.Client]


@pytest.fixture
def world() -> Iterator[World]:
    """The fleet's app on a real loopback socket (uvicorn in a thread), as the controller reaches it."""
    wall = Wall()
    fleet = SimFleet(VirtualClock(10.0, wall), 5, lambda _n, gib: Workload(gib, gib * 0.1, 64.0, 10.0))
    fleet.add(SimHost("h0", "pool-a", "fd0", 64, 512))
    fleet.add(SimHost("h1", "pool-a", "fd1", 64, 512))
    fleet.ledger.intend("vm", Intent(opted_in=True))
    sock, url = listen_socket("127.0.0.1", 0)
    fleet.api_prefix = url
    server = uvicorn.Server(uvicorn.Config(create_app(fleet), log_level="critical", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    with httpx.Client(base_url=url, timeout=10) as http:
        yield fleet, wall, http
    server.should_exit = True
    thread.join(10)
    sock.close()


def _advance(fleet: SimFleet, wall: Wall, seconds: float) -> None:
    wall.t += seconds
    with fleet.lock:
        fleet.scheduler.run_due()


def test_a_live_migration_moves_the_vm_once_with_a_measured_blackout(world: World) -> None:
    fleet, wall, http = world
    assert http.post("/h/h0/v1/vms", json={"name": "vm", "size": "Standard_DC2as_v5"}).status_code == 201
    started = http.post("/h/h0/v1/vms/vm/migrate", json={"destination": fleet.url_of("h1")})
    assert started.status_code == 202
    mig = started.json()["migration"]
    assert http.post("/h/h0/v1/vms/vm/migrate", json={"destination": fleet.url_of("h1")}).status_code == 409
    _advance(fleet, wall, 3600)
    status = http.get(f"/h/h0/v1/migrations/{mig}").json()
    assert status["status"] == "completed"
    assert status["downtime"] > 0
    assert http.get("/h/h0/v1/vms/vm").status_code == 404
    assert http.get("/h/h1/v1/vms/vm").json()["state"] == "running"
    assert fleet.ledger.where("vm") == {"h1": True}
    assert [b.method for b in fleet.ledger.blackouts] == [Method.LIVE]
    assert fleet.ledger.verdict().two_copies == 0


def test_a_destination_that_fails_in_pre_copy_leaves_the_vm_at_its_source(
    world: World,
) -> None:
    fleet, wall, http = world
    http.post("/h/h0/v1/vms", json={"name": "vm", "size": "Standard_DC8as_v5"})
    mig = http.post("/h/h0/v1/vms/vm/migrate", json={"destination": fleet.url_of("h1")}).json()["migration"]
    with fleet.lock:
        fleet.fail_host(fleet.hosts["h1"], fleet.clock.now(), 5.0)
    _advance(fleet, wall, 0.01)
    assert http.get(f"/h/h0/v1/migrations/{mig}").json()["status"] == "failed"
    assert http.get("/h/h0/v1/vms/vm").json()["state"] == "running"
    with pytest.raises(httpx.RemoteProtocolError):
        http.get("/h/h1/v1/vms")  # a down host drops the connection mid-answer: a transport error
    _advance(fleet, wall, 1.0)
    assert http.get("/h/h1/v1/vms").json() == {"vms": []}


def test_in_place_maintenance_is_idempotent_by_id_and_exclusive(world: World) -> None:
    fleet, wall, http = world
    http.post("/h/h0/v1/vms", json={"name": "vm", "size": "Standard_DC2as_v5"})
    body = {"id": "m1", "kind": "MemoryPreservingUpdate"}
    first = http.post("/h/h0/v1/host/maintenance", json=body)
    assert first.status_code == 202
    assert first.json()["status"] == "InProgress"
    assert http.post("/h/h0/v1/host/maintenance", json=body).json()["id"] == "m1"
    assert http.post("/h/h0/v1/host/maintenance", json={**body, "id": "m2"}).status_code == 409
    _advance(fleet, wall, 60)
    record = http.get("/h/h0/v1/host/maintenance/m1").json()
    assert record["status"] == "Succeeded"
    assert record["daemonRestarted"]
    assert record["platformRestarted"]
    [vm] = record["vms"]
    assert vm["name"] == "vm"
    assert vm["outcome"] == "Succeeded"
    assert vm["reattested"]
    assert INPLACE_PAUSE_MS_RANGE[0] <= vm["pauseMs"] <= INPLACE_PAUSE_MS_RANGE[1]
    assert [(round(b.ms, 1), b.method) for b in fleet.ledger.blackouts] == [(vm["pauseMs"], Method.INPLACE)]


def test_scheduled_events_refuse_an_older_incarnation(world: World) -> None:
    fleet, wall, http = world
    fleet.approve_early = 1.0
    http.post("/h/h0/v1/vms", json={"name": "vm", "size": "Standard_DC2as_v5"})
    event = {"EventId": "e1", "EventType": "Freeze", "EventStatus": "Scheduled", "Resources": ["vm"]}
    doc = {"DocumentIncarnation": 2, "Events": [event]}
    assert http.put("/h/h0/v1/vms/vm/scheduledevents", json=doc).status_code == 200
    assert http.put("/h/h0/v1/vms/vm/scheduledevents", json={**doc, "DocumentIncarnation": 1}).status_code == 409
    _advance(fleet, wall, 5)  # the guest approves within 1-10 virtual seconds
    seen = http.get("/h/h0/v1/vms/vm/scheduledevents").json()
    assert seen["document"]["DocumentIncarnation"] == 2
    assert seen["startRequests"] == [{"EventId": "e1"}]


def test_bad_requests_get_the_hosts_error_envelope(world: World) -> None:
    _, _, http = world
    assert http.post("/h/h0/v1/vms/nope/migrate", json={"destination": "x"}).status_code == 404
    http.post("/h/h0/v1/vms", json={"name": "vm", "size": "Standard_DC2as_v5"})
    wrong = http.post("/h/h0/v1/vms/vm/migrate", json={"destination": "http://elsewhere/h/zz"})
    assert wrong.status_code == 400
    assert wrong.json()["error"]["kind"] == "UsageError"
    assert http.get("/h/nosuch/v1/vms").status_code == 404


def test_a_status_request_may_wait_for_the_migration_to_settle(world: World) -> None:
    """``?wait=S`` as on a real host: answered once the move settles (here: the test's clock jumps past it while
    the request waits), or after S seconds with the progress so far."""
    fleet, wall, http = world
    http.post("/h/h0/v1/vms", json={"name": "vm", "size": "Standard_DC2as_v5"})
    mig = http.post("/h/h0/v1/vms/vm/migrate", json={"destination": fleet.url_of("h1")}).json()["migration"]
    assert http.get(f"/h/h0/v1/migrations/{mig}", params={"wait": "0.2"}).json()["status"] == "active"
    timer = threading.Timer(0.3, lambda: setattr(wall, "t", wall.t + 3600))
    timer.start()
    try:
        answer = http.get(f"/h/h0/v1/migrations/{mig}", params={"wait": "25"}, timeout=20)
    finally:
        timer.join()
    assert answer.json()["status"] == "completed"  # within the client's 20 s: it did not wait the 25 asked
    for bad in ("-1", "31", "soon"):
        refused = http.get(f"/h/h0/v1/migrations/{mig}", params={"wait": bad})
        assert refused.status_code == 422
        assert "wait" in refused.json()["error"]["message"]
