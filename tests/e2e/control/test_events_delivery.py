"""Fleet events out of real controller processes: a webhook delivery survives a SIGKILL of the controller
mid-delivery (nothing lost; an event whose answer was lost arrives again with the same ``webhook-id``), on
SQLite and PostgreSQL; a stream on one PostgreSQL replica carries the events another commits and resumes by
``Last-Event-ID`` with nothing lost or repeated; and event ids become visible in commit order under
concurrent PostgreSQL writers (the outbox lock), so a cursor never skips one."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import insert, select, text
from sqlalchemy.orm import Session

from cvmotion.control.db import Event, open_database
from cvmotion.control.events import EventFilter, read_after
from cvmotion.control.webhook_receiver import WebhookReceiver
from cvmotion.testing.controller import ControllerProcess
from cvmotion.testing.fakehost import FakeHost
from cvmotion.testing.postgres import PostgresServer

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
REGISTER = "/providers/Cvmotion.Fabric/hosts/register"
REGISTERED = "Cvmotion.Fabric.HostRegistered"


def _register(ctl: ControllerProcess, host: FakeHost, name: str) -> None:
    body = host.registration() | {"name": name, "chip_id": f"{sum(map(ord, name)):04x}" * 16}
    response = ctl.api("POST", REGISTER, body)
    assert response.status_code == 200, response.text


def _subjects(received: list[Any]) -> list[str]:
    return [r.event["subject"].rsplit("/", 1)[-1] for r in received]


@pytest.mark.timeout(240)
def test_sigkill_mid_delivery_loses_no_event(
    db_url: str | None, tmp_path: Path, fakehosts: dict[str, FakeHost]
) -> None:
    # SQLite: the restarted controller frees the dead one's claims at once.  PostgreSQL: the claim's lease
    # (15 s) must run out first, so one point there.
    points = ["Webhook:Claimed", "Webhook:Answered"] if db_url is None else ["Webhook:Answered"]
    fault = tmp_path / "kill-at"
    ctl = ControllerProcess(tmp_path / "ctl", db_url, env={"CVMOTION_FAULT_KILL_FILE": str(fault)}).start()
    host = fakehosts["h1"]
    try:
        with WebhookReceiver(SECRET) as receiver:
            made = ctl.api("POST", "/v1/webhooks", {"url": receiver.url, "secret": SECRET, "types": [REGISTERED]})
            assert made.status_code == 201, made.text
            hook = made.json()["id"]
            for point in points:
                name = point.split(":")[1].lower()
                fault.write_text(point)
                with contextlib.suppress(httpx.TransportError):  # killed before it answered: the event is durable
                    _register(ctl, host, name)
                assert ctl.wait_exit(60) == -9, point  # the delivery thread reached the point
                assert not fault.exists()
                ctl.start()
                # Claimed: never sent before the kill, sent once after.  Answered: sent, its answer lost with
                # the process, sent again after the restart with the same webhook-id.
                arrivals = 2 if point == "Webhook:Answered" else 1
                receiver.wait_for(lambda r, n=name, k=arrivals: _subjects(r).count(n) == k, timeout=60)
                _settled(ctl, hook, 1 + points.index(point))  # recorded, before the next point is armed
                mine = [r for r in receiver.received if _subjects([r]) == [name]]
                assert len(mine) == arrivals
                assert len({r.webhook_id for r in mine}) == 1
                assert [r.duplicate for r in mine] == [False, True][:arrivals]
    finally:
        ctl.kill()


def _settled(ctl: ControllerProcess, hook: str, count: int) -> None:
    deadline = time.monotonic() + 60
    while True:
        deliveries = ctl.api("GET", f"/v1/webhooks/{hook}/deliveries").json()["value"]
        if len(deliveries) == count and {d["state"] for d in deliveries} == {"Succeeded"}:
            return
        assert time.monotonic() < deadline, deliveries
        time.sleep(0.05)


def _sse(lines: Iterator[str], count: int) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    msg_id = ""
    for line in lines:
        if line.startswith("id: "):
            msg_id = line[4:]
        elif line.startswith("data: "):
            out.append((msg_id, json.loads(line[6:])))
            if len(out) == count:
                return out
    raise AssertionError(f"the stream ended after {len(out)} of {count}")


@pytest.mark.timeout(180)
def test_a_replica_streams_what_another_commits_and_resumes(
    postgres: PostgresServer, tmp_path: Path, fakehosts: dict[str, FakeHost]
) -> None:
    db = postgres.database()
    a = ControllerProcess(tmp_path / "a", db).start()
    b = ControllerProcess(tmp_path / "b", db).start()
    host = fakehosts["h1"]
    try:
        headers = {"Authorization": f"Bearer {a.owner_token}"}
        url = f"{b.url}/v1/events?follow=true&type={REGISTERED}"
        _register(a, host, "first")
        with httpx.stream("GET", url + "&limit=1", headers=headers, timeout=30) as sse:
            lines = sse.iter_lines()
            [(start, _)] = _sse(lines, 1)
            _register(a, host, "second")  # committed by replica a; b finds it by its bounded poll
            [(last, event)] = _sse(lines, 1)
        assert event["subject"].endswith("/second")
        for name in ("third", "fourth"):  # while the client is away
            _register(a, host, name)
        with httpx.stream("GET", url, headers=headers | {"Last-Event-ID": last}, timeout=30) as sse:
            resumed = _sse(sse.iter_lines(), 2)
        assert [e["subject"].rsplit("/", 1)[-1] for _, e in resumed] == ["third", "fourth"]
        assert int(start) < int(last) < int(resumed[0][0]) < int(resumed[1][0])
    finally:
        a.kill()
        b.kill()


@pytest.mark.timeout(120)
def test_event_ids_appear_in_commit_order(postgres: PostgresServer) -> None:
    """A writer that inserted an event and has not committed holds back a later writer's event, so a reader
    following ``id > cursor`` never sees 11 before 10 (and never skips 10)."""
    engine = open_database(postgres.database())
    inserted, second_done = threading.Event(), threading.Event()
    release = threading.Event()

    def slow() -> None:
        with engine.begin() as conn:
            conn.execute(insert(Event).values(type="cvmotion.test.slow", subject="/s", data={}, time=0.0))
            inserted.set()
            release.wait(30)

    def quick() -> None:
        inserted.wait(30)
        with engine.begin() as conn:
            conn.execute(insert(Event).values(type="cvmotion.test.quick", subject="/q", data={}, time=0.0))
        second_done.set()

    def quick_is_waiting() -> bool:
        with engine.connect() as conn:
            return bool(conn.execute(text("SELECT count(*) FROM pg_locks WHERE NOT granted")).scalar())

    threads = [threading.Thread(target=slow), threading.Thread(target=quick)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 30
        while not (second_done.is_set() or quick_is_waiting()):
            assert time.monotonic() < deadline, "the second writer neither committed nor waited"
            time.sleep(0.01)
        seen: list[str] = []
        with Session(engine) as session:
            rows, cursor = read_after(session, 0, EventFilter(), 100)
            seen += [r.type for r in rows]
        release.set()
        for thread in threads:
            thread.join(30)
        with Session(engine) as session:
            rows, cursor = read_after(session, cursor, EventFilter(), 100)
            seen += [r.type for r in rows]
        assert sorted(seen) == ["cvmotion.test.quick", "cvmotion.test.slow"]
    finally:
        release.set()
        engine.dispose()


@pytest.mark.timeout(120)
def test_replicas_fan_out_and_claim_each_delivery_once(postgres: PostgresServer) -> None:
    """Several delivery threads (as of several replicas) fanning out and claiming at once on PostgreSQL:
    each event becomes one delivery per webhook, and each delivery is claimed by one thread."""
    from cvmotion.control import webhooks
    from cvmotion.control.auth import Principal, Role
    from cvmotion.control.db import WebhookDelivery
    from cvmotion.control.events_schema import WebhookBody

    engine = open_database(postgres.database())
    owner = Principal(Role.OWNER, "*")
    try:
        with Session(engine) as s, s.begin():
            for i in range(6):
                body = WebhookBody.model_validate({"url": f"http://127.0.0.1:9/{i}"})
                webhooks.create_webhook(s, owner, body, 0.0)
        with Session(engine) as s, s.begin():
            s.add_all(Event(type="cvmotion.test.fan", subject=f"/e{i}", data={}) for i in range(40))
        claimed: list[int] = []
        lock = threading.Lock()

        def work(worker: str) -> None:
            while True:
                with Session(engine) as s, s.begin():
                    webhooks.fan_out(s, 0.0, batch=7)
                with Session(engine) as s, s.begin():
                    got = webhooks.claim_delivery(s, worker, 1.0, 60.0)
                if got is None:
                    with Session(engine) as s:
                        if not webhooks.fan_out_due(s):
                            return
                    continue
                with lock:
                    claimed.append(got.delivery_id)

        threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        with Session(engine) as s:
            rows = list(s.scalars(select(WebhookDelivery)))
        assert len(rows) == 6 * 40  # every event, every webhook, once
        assert len(claimed) == len(set(claimed)) == 6  # one in flight per webhook, each claimed once
        assert {r.webhook for r in rows if r.id in claimed} == {r.webhook for r in rows}
    finally:
        engine.dispose()
