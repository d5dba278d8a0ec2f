"""sim layer: one ASGI app serving every simulated host, each under ``/h/<host>/v1/...``.

The controller's unmodified host client reaches each host at the ``api_url`` the host registered
(``http://127.0.0.1:PORT/h/<host>``), over real HTTP.  The subset of the host API served is what the
controller calls: VMs (create/get/delete/list), attestation, migrate + migration status/list/cancel, host
maintenance (``POST /v1/host/maintenance``, ``GET /v1/host/maintenance/{id}``) and a VM's Scheduled Events
(``PUT/GET /v1/vms/{name}/scheduledevents``).  A host that is down aborts the connection mid-answer, so the
client sees what a dead daemon gives it: a transport error, not an HTTP status.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from cvmotion.sim.hosts import SimError, SimFleet, SimHost

__all__ = ["HostDown", "create_app"]

Handler = Callable[[SimFleet, SimHost, Request], Any]


class HostDown(Exception):
    """Raised after the answer's headers went out: the server drops the connection (a dead daemon)."""


def _error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"kind": kind, "message": message}}, status_code=status)


async def _body(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        raise SimError(400, "UsageError", "the body is not JSON") from None


class _Dropped(Response):
    """Starts an answer and then fails, so uvicorn closes the connection without completing it."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 503, "headers": [(b"content-length", b"64")]})
        raise HostDown("simulated host is down")


def _route(fleet: SimFleet, handler: Handler, status: int = 200) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        name = request.path_params["host"]
        body = await _body(request) if request.method in ("POST", "PUT") else None
        with fleet.lock:
            fleet.scheduler.run_due()  # the world is up to date before anyone looks at it
            host = fleet.hosts.get(name)
            if host is None:
                return _error(404, "NotFound", f"no simulated host {name!r}")
            if host.down:
                return _Dropped()
            request.state.body = body
            try:
                return JSONResponse(handler(fleet, host, request), status_code=status)
            except SimError as exc:
                return _error(exc.status, exc.kind, str(exc))

    return endpoint


def _p(request: Request, key: str) -> str:
    return str(request.path_params[key])


def _host(f: SimFleet, host: SimHost, r: Request) -> Any:
    return host.registration(f.url_of(host.name))


def _list(f: SimFleet, host: SimHost, r: Request) -> Any:
    return {"vms": [vm.view(host.chip_id) for vm in host.vms.values()]}


def _create(f: SimFleet, host: SimHost, r: Request) -> Any:
    return f.create_vm(host, r.state.body)


def _get(f: SimFleet, host: SimHost, r: Request) -> Any:
    return f.get_vm(host, _p(r, "name")).view(host.chip_id)


def _delete(f: SimFleet, host: SimHost, r: Request) -> Any:
    return f.delete_vm(host, _p(r, "name"))


def _attest(f: SimFleet, host: SimHost, r: Request) -> Any:
    return f.attestation(host, _p(r, "name"))


def _migrate(f: SimFleet, host: SimHost, r: Request) -> Any:
    return f.migrate(host, _p(r, "name"), r.state.body)


def _put_events(f: SimFleet, host: SimHost, r: Request) -> Any:
    return f.put_events(host, _p(r, "name"), r.state.body)


def _get_events(f: SimFleet, host: SimHost, r: Request) -> Any:
    return f.events(host, _p(r, "name"))


def _migrations(f: SimFleet, host: SimHost, r: Request) -> Any:
    return {"migrations": [m.view() for m in host.migrations.values()]}


def _migration(f: SimFleet, host: SimHost, r: Request) -> Any:
    return f.migration(host, _p(r, "mid")).view()


_SETTLED = frozenset({"completed", "failed", "cancelled"})
MAX_WAIT_S = 30.0  # as the host daemon's long-poll
_TICK_S = 0.005


def _long_poll(fleet: SimFleet) -> Callable[[Request], Awaitable[Response]]:
    """``GET /migrations/{mid}?wait=S`` as the host daemon answers it: once the migration settles or after S
    seconds.  The world only moves when someone looks (``run_due``), so it looks every few milliseconds,
    without holding a thread."""
    answer = _route(fleet, _migration)

    async def endpoint(request: Request) -> Response:
        try:
            wait = float(request.query_params.get("wait", "0"))
        except ValueError:
            wait = -1.0
        if not 0.0 <= wait <= MAX_WAIT_S:
            return _error(422, "UsageError", f"wait must be a number of seconds from 0 to {MAX_WAIT_S:g}")
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with fleet.lock:
                fleet.scheduler.run_due()
                host = fleet.hosts.get(request.path_params["host"])
                mig = None if host is None or host.down else host.migrations.get(request.path_params["mid"])
                if mig is None or mig.status in _SETTLED:
                    break  # settled, or an answer that is no migration's progress: give it now
            await asyncio.sleep(min(_TICK_S, max(0.0, deadline - time.monotonic())))
        return await answer(request)

    return endpoint


def _cancel(f: SimFleet, host: SimHost, r: Request) -> Any:
    return f.cancel(host, _p(r, "mid"))


def _start_maintenance(f: SimFleet, host: SimHost, r: Request) -> Any:
    return f.start_maintenance(host, r.state.body).view(f.iso)


def _maintenance(f: SimFleet, host: SimHost, r: Request) -> Any:
    record = host.maintenance.get(_p(r, "mid"))
    if record is None:
        raise SimError(404, "NotFound", f"no maintenance {_p(r, 'mid')} on {host.name}")
    return record.view(f.iso)


_ROUTES: tuple[tuple[str, str, Handler, int], ...] = (
    ("GET", "/host", _host, 200),
    ("GET", "/vms", _list, 200),
    ("POST", "/vms", _create, 201),
    ("GET", "/vms/{name}", _get, 200),
    ("DELETE", "/vms/{name}", _delete, 200),
    ("GET", "/vms/{name}/attestation", _attest, 200),
    ("POST", "/vms/{name}/migrate", _migrate, 202),
    ("PUT", "/vms/{name}/scheduledevents", _put_events, 200),
    ("GET", "/vms/{name}/scheduledevents", _get_events, 200),
    ("GET", "/migrations", _migrations, 200),
    ("GET", "/migrations/{mid}", _migration, 200),
    ("POST", "/migrations/{mid}/cancel", _cancel, 200),
    ("POST", "/host/maintenance", _start_maintenance, 202),
    ("GET", "/host/maintenance/{mid}", _maintenance, 200),
)


def create_app(fleet: SimFleet) -> Starlette:
    # uvicorn logs every dropped answer as an application error; a down host is the point, not news.
    logging.getLogger("uvicorn.error").addFilter(lambda r: "HostDown" not in str(r.exc_info))
    routes = [
        Route(
            f"/h/{{host}}/v1{path}",
            _long_poll(fleet) if handler is _migration else _route(fleet, handler, status),
            methods=[method],
        )
        for method, path, handler, status in _ROUTES
    ]
    return Starlette(routes=routes)
