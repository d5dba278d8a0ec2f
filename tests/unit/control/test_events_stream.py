"""Fleet events as CloudEvents over the API: rendering, filters, visibility, and the Server-Sent Event stream
(``id:`` lines, resume by ``Last-Event-ID`` or ``?after=`` with nothing lost or repeated, keep-alives, a
bounded lifetime, and a wake-up on this replica's commit rather than a fast poll)."""

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
from control_harness import Api

from cvmotion.control.api import create_app
from cvmotion.control.auth import Role
from cvmotion.control.db import Event
from cvmotion.control.events_api import StreamOptions
from cvmotion.control.outbox import Notifier
from cvmotion.control.service import FleetController
from cvmotion.ipc.http import ServerThread, listen_socket


@contextlib.contextmanager
def serving(ctl: FleetController) -> Iterator[Api]:
    """Start ``ctl`` and its API on loopback; ``api.app`` is the app (a test sets the stream's options on it)."""
    ctl.start()
    app = create_app(ctl)
    try:
        sock, url = listen_socket("127.0.0.1", 0)
        with ServerThread(app, sock, url), httpx.Client(base_url=url, timeout=30) as client:
            a = Api(client, ctl)
            a.app = app  # type: ignore[attr-defined]
            yield a
    finally:
        ctl.stop()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    """A controller with no hosts: events are recorded directly."""
    with serving(FleetController(tmp_path / "ctl", workers=1)) as a:
        yield a


VM = "/subscriptions/{sub}/resourcegroups/rg1/providers/microsoft.compute/virtualmachines/{name}"


def record(api: Api, type_: str, subject: str, data: dict[str, Any] | None = None) -> None:
    api.ctl.transaction(lambda s: s.add(Event(type=type_, subject=subject, data=data or {})))


def vm(sub: str, name: str) -> str:
    return VM.format(sub=sub, name=name)


def sse_messages(lines: Iterator[str], count: int) -> list[tuple[str, dict[str, Any]]]:
    """The next ``count`` messages of a stream: (id, CloudEvent)."""
    out: list[tuple[str, dict[str, Any]]] = []
    msg_id = ""
    for line in lines:
        if line.startswith("id: "):
            msg_id = line[4:]
        elif line.startswith("data: "):
            out.append((msg_id, json.loads(line[6:])))
            if len(out) == count:
                return out
    raise AssertionError(f"the stream ended after {len(out)} of {count} messages")


def get(api: Api, path: str, token: str | None = "owner", **params: Any) -> Any:
    headers = {"Authorization": f"Bearer {api.owner if token == 'owner' else token}"}
    return api.client.get(path, params=params, headers=headers)


def test_cloud_events_render_both_namings(api: Api) -> None:
    record(api, "cvmotion.migration.completed", vm("default", "a"), {"vm": "a", "totalMs": 812, "downtimeMs": 41})
    record(api, "HostUnavailable", "/providers/Cvmotion.Fabric/hosts/h1")
    events = get(api, "/v1/events", limit=2).json()["value"]
    first, second = events
    assert first["type"] == "cvmotion.migration.completed"
    assert second["type"] == "Cvmotion.Fabric.HostUnavailable"
    assert {k: first[k] for k in ("specversion", "source", "subject", "datacontenttype")} == {
        "specversion": "1.0",
        "source": "/cvmotion/controller",
        "subject": vm("default", "a"),
        "datacontenttype": "application/json",
    }
    assert first["data"] == {"vm": "a", "totalMs": 812, "downtimeMs": 41}
    assert int(second["id"]) == int(first["id"]) + 1
    assert first["time"].endswith("Z")
    # The older path answers the same.
    assert get(api, "/providers/Cvmotion.Fabric/events", limit=2).json()["value"] == events


def test_type_subject_and_after_filters(api: Api) -> None:
    record(api, "cvmotion.maintenance.scheduled", "/providers/Cvmotion.Fabric/hosts/h1")
    start = int(get(api, "/v1/events", limit=1).json()["value"][-1]["id"])
    record(api, "cvmotion.migration.started", vm("default", "a"))
    record(api, "cvmotion.migration.failed", vm("default", "b"), {"reason": "DestinationUnreachable"})
    record(api, "cvmotion.maintenance.started", "/providers/Cvmotion.Fabric/hosts/h1")
    record(api, "VmCreated", vm("default", "b"))

    def types(**params: Any) -> list[str]:
        return [e["type"] for e in get(api, "/v1/events", after=start, **params).json()["value"]]

    assert types(type="cvmotion.migration.*") == ["cvmotion.migration.started", "cvmotion.migration.failed"]
    assert types(type=["cvmotion.maintenance.started", "Cvmotion.Fabric.VmCreated"]) == [
        "cvmotion.maintenance.started",
        "Cvmotion.Fabric.VmCreated",
    ]
    assert types(type="Cvmotion.Fabric.*") == ["Cvmotion.Fabric.VmCreated"]
    assert len(types(type="cvmotion.*")) == 3
    assert types(subject=vm("DEFAULT", "b").upper()) == ["cvmotion.migration.failed", "Cvmotion.Fabric.VmCreated"]
    assert types(limit=2) == ["cvmotion.migration.started", "cvmotion.migration.failed"]
    bad = get(api, "/v1/events", type="cvmotion.migration.%")
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "InvalidRequestContent"
    assert get(api, "/v1/events", after=-1).status_code == 400


def test_visibility_follows_the_subscription(api: Api) -> None:
    record(api, "cvmotion.migration.completed", vm("alpha", "a"))
    record(api, "cvmotion.migration.completed", vm("beta", "b"))
    record(api, "cvmotion.maintenance.completed", "/providers/Cvmotion.Fabric/hosts/h1")
    alpha = api.token(Role.READER, "alpha")
    subjects = [e["subject"] for e in get(api, "/v1/events", alpha, limit=3).json()["value"]]
    assert vm("beta", "b") not in subjects
    assert vm("alpha", "a") in subjects
    assert "/providers/Cvmotion.Fabric/hosts/h1" in subjects
    host = api.token(Role.HOST)
    assert get(api, "/v1/events", host).status_code == 403
    assert get(api, "/v1/events", None).status_code == 401


def test_stream_resumes_after_last_event_id_with_nothing_lost_or_repeated(api: Api) -> None:
    for i in range(5):
        record(api, "cvmotion.migration.started", vm("default", f"v{i}"))
    headers = {"Authorization": f"Bearer {api.owner}"}
    with api.client.stream("GET", "/v1/events?follow=true&limit=3", headers=headers) as sse:
        assert sse.headers["content-type"].startswith("text/event-stream")
        got = sse_messages(sse.iter_lines(), 3)
    assert [i for i, e in got] == [e["id"] for _, e in got]  # the id line is the event's id
    last = got[-1][0]
    for i in range(5, 8):  # committed while the client was away
        record(api, "cvmotion.migration.started", vm("default", f"v{i}"))
    with api.client.stream("GET", "/v1/events?follow=true", headers=headers | {"Last-Event-ID": last}) as sse:
        resumed = sse_messages(sse.iter_lines(), 3)
    assert [int(i) for i, _ in resumed] == [int(last) + 1, int(last) + 2, int(last) + 3]
    assert [e["subject"].rsplit("/", 1)[-1] for _, e in resumed] == ["v5", "v6", "v7"]
    # ?after= is the same cursor for clients that cannot set headers.
    with api.client.stream("GET", f"/v1/events?follow=true&after={last}&limit=2", headers=headers) as sse:
        assert [i for i, _ in sse_messages(sse.iter_lines(), 3)] == [i for i, _ in resumed]


def test_stream_wakes_on_a_commit_of_this_replica(api: Api) -> None:
    # A poll of a minute: an event that arrives within seconds came by the in-process wake-up.
    _set_stream_options(api, StreamOptions(poll_s=60.0, keepalive_s=60.0))
    record(api, "cvmotion.maintenance.scheduled", "/hosts/h8")
    headers = {"Authorization": f"Bearer {api.owner}"}
    with api.client.stream("GET", "/v1/events?follow=true&limit=1", headers=headers, timeout=20) as sse:
        lines = sse.iter_lines()
        sse_messages(lines, 1)
        started = time.monotonic()
        threading.Timer(0.2, record, (api, "cvmotion.maintenance.scheduled", "/hosts/h9")).start()
        [(_, event)] = sse_messages(lines, 1)
    assert event["type"] == "cvmotion.maintenance.scheduled"
    assert time.monotonic() - started < 10.0


def test_stream_keeps_alive_and_ends_after_its_lifetime(api: Api) -> None:
    _set_stream_options(api, StreamOptions(lifetime_s=2.0, keepalive_s=0.1, poll_s=0.05, retry_ms=500))
    record(api, "cvmotion.maintenance.scheduled", "/hosts/h8")
    headers = {"Authorization": f"Bearer {api.owner}"}
    with api.client.stream("GET", "/v1/events?follow=true&limit=1", headers=headers, timeout=20) as sse:
        lines = list(sse.iter_lines())  # returns: the stream ends by itself
    assert lines[0] == "retry: 500"
    assert ": keep-alive" in lines
    assert sum(line.startswith("data: ") for line in lines) == 1


def test_notifier_wakes_threads_and_tasks() -> None:
    import asyncio

    notifier = Notifier()
    seen = notifier.generation
    assert not notifier.wait(seen, 0.01)
    threading.Timer(0.05, notifier.notify).start()
    assert notifier.wait(seen, 10.0)

    async def main() -> bool:
        mark = notifier.generation
        asyncio.get_running_loop().call_later(0.05, threading.Thread(target=notifier.notify).start)
        return await notifier.wait_async(mark, 10.0)

    assert asyncio.run(main())


def _set_stream_options(api: Api, options: StreamOptions) -> None:
    api.app.state.event_stream = options  # type: ignore[attr-defined]


def test_outbox_holds_events_to_commit_and_drops_a_rolled_back_savepoints(api: Api) -> None:
    from sqlalchemy import func, select

    def body(s: Any) -> None:
        s.add(Event(type="cvmotion.test.kept", subject="/k", data={}))
        s.flush()
        assert s.scalar(select(func.count()).select_from(Event).where(Event.subject == "/k")) == 0  # held back
        with contextlib.suppress(RuntimeError), s.begin_nested():
            s.add(Event(type="cvmotion.test.dropped", subject="/d", data={}))
            s.flush()
            raise RuntimeError("roll the savepoint back")
        with s.begin_nested():
            s.add(Event(type="cvmotion.test.inner", subject="/i", data={}))

    api.ctl.transaction(body)
    with contextlib.suppress(ZeroDivisionError):
        api.ctl.transaction(lambda s: (s.add(Event(type="cvmotion.test.rolled", subject="/r", data={})), 1 / 0))
    types = [e["type"] for e in get(api, "/v1/events", type="cvmotion.test.*").json()["value"]]
    assert types == ["cvmotion.test.kept", "cvmotion.test.inner"]
