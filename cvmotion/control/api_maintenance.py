"""control layer: the API of host maintenance — drains, cordons, windows, and a VM's Scheduled Events.

Host drains and windows are fleet operations: they need role Owner at every subscription (``*``), since a
host carries VMs of many subscriptions.  A VM's Scheduled Events document is its owner's to read
(Reader) and to approve early (Contributor, Owner), at the VM's subscription, in IMDS's own body shape
(``{"StartRequests": [{"EventId": ...}]}``).  Handlers only parse and call ``control.drains``,
``control.windows`` and ``control.scheduled_events`` inside one transaction.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from cvmotion.control import drains, windows
from cvmotion.control import scheduled_events as se
from cvmotion.control.api_schema import ArmResource, HostName, Rg, Sub, VmName, json_request, refusals
from cvmotion.control.auth import ALL_SUBSCRIPTIONS, Action, Principal, authorize
from cvmotion.control.db_maintenance import Drain, MaintenanceWindow
from cvmotion.control.drainstates import DrainReason
from cvmotion.control.errors import Forbidden
from cvmotion.control.scheduled_events import EVENT_ID_PATTERN
from cvmotion.control.service import FleetController
from cvmotion.errors import NotFound

__all__ = ["install_maintenance"]

_HOSTS = "/providers/Cvmotion.Fabric/hosts"
_DRAINS = "/providers/Cvmotion.Fabric/drains"
_WINDOWS = "/providers/Cvmotion.Fabric/maintenanceWindows"
_VMS = "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines"
_EVENT_EXAMPLE = "602D9444-D2AC-4A9E-AAD6-8F2AE1E8B4E1"
_bearer = HTTPBearer(auto_error=False, scheme_name="BearerToken", description="cvmotion controller token create")

_DRAIN_HEADERS = {
    "Azure-AsyncOperation": {
        "description": "the drain to poll (GET): Accepted, Running or Canceling, then Succeeded,"
        " PartiallySucceeded, Failed or Canceled",
        "schema": {"type": "string", "format": "uri"},
    },
    "Location": {"description": "the same drain URL", "schema": {"type": "string", "format": "uri"}},
    "Retry-After": {"description": "seconds to wait before polling", "schema": {"type": "string"}},
}

DrainId = Annotated[str, Path(pattern=r"^[0-9a-f-]{36}$", examples=["0b8e7a5c-3f1d-4a59-9a4e-6f1b2c3d4e5f"])]
WindowName = Annotated[str, Path(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$", examples=["patch-tuesday"])]


def _principal(request: Request, _: Annotated[Any, Depends(_bearer)] = None) -> Principal:
    from cvmotion.control.api import _caller  # api includes this router: imported when a request is served

    return _caller(request)


async def _body(request: Request) -> Any:
    from cvmotion.control.api import _json_body

    return await _json_body(request)


def _parse(model: type[BaseModel], body: Any, what: str) -> Any:
    from cvmotion.control.api import _parse as parse

    return parse(model, body, what)


async def _optional_body(request: Request) -> Any:
    from cvmotion.control.api import NO_BODY, _optional_json_body

    body = await _optional_json_body(request)
    return {} if body is NO_BODY else body  # absent: every field's default; JSON null: refused by the model


Caller = Annotated[Principal, Depends(_principal)]
JsonBody = Annotated[Any, Depends(_body)]
OptionalBody = Annotated[Any, Depends(_optional_body)]


def _fleet_operator(principal: Principal) -> None:
    authorize(principal, Action.MIGRATE)
    if principal.subscription != ALL_SUBSCRIPTIONS:
        raise Forbidden("host maintenance acts on every subscription's VMs: it needs a token for '*'")


# -- response documents (extra keys allowed: the views may grow) -----------------------------------------


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class DrainedVm(_Open):
    name: str
    resourceGroup: str  # noqa: N815 - the wire's name
    method: str = Field(description="LiveMigration, MemoryPreservingUpdate, Redeploy or None")
    step: str = Field(description="the ladder step it is at (Done once it has an outcome)")
    outcome: str | None = Field(description="Succeeded, Failed or Blocked; null while it runs")
    progress: dict[str, Any] | None = Field(description="a live move's round, remaining bytes, Mbit/s")


class DrainView(_Open):
    id: str
    host: str
    reason: str
    status: str = Field(description="Accepted, Running, Canceling, Succeeded, PartiallySucceeded, Failed, Canceled")
    vms: list[DrainedVm]


class DrainList(BaseModel):
    value: list[DrainView]


class WindowView(_Open):
    id: str
    name: str
    hosts: list[str]
    status: str = Field(description="Scheduled, Running, Completed, Expired or Canceled")


class WindowList(BaseModel):
    value: list[WindowView]


class ScheduledEventsView(_Open):
    DocumentIncarnation: int
    Events: list[dict[str, Any]]


class StartRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    EventId: str = Field(pattern=EVENT_ID_PATTERN)


class StartRequests(BaseModel):
    """IMDS's early approval body."""

    model_config = ConfigDict(extra="forbid")
    StartRequests: list[StartRequest] = Field(min_length=1, max_length=64)


def install_maintenance(app: FastAPI, ctl: FleetController) -> None:  # noqa: C901 - one closure per route
    router: APIRouter = app.router  # plain routes on the app's own router: in the OpenAPI document as written

    def drain_response(drain: Drain, view: dict[str, Any], status: int = 200, base: str = "") -> JSONResponse:
        response = JSONResponse(view, status_code=status)
        response.headers["Location"] = f"{_HOSTS}/{drain.host}/drain"
        if status == 202:
            # The drain is its own long-running operation: its record (Accepted/Running until it ends) is what
            # a client polls, by id, so a later drain of the same host does not answer for this one.
            location = f"{base}{_DRAINS}/{drain.id}"
            response.headers["Azure-AsyncOperation"] = location
            response.headers["Location"] = location
            response.headers["Retry-After"] = "5"
        return response

    @router.post(
        _HOSTS + "/{name}/drain",
        operation_id="drain_host",
        summary="cordon a host and move every VM off it down the ladder (202; poll GET .../drain)",
        response_model=None,
        responses={
            202: {"model": DrainView, "description": "accepted: poll Azure-AsyncOperation", "headers": _DRAIN_HEADERS},
            **refusals(404, 409, body=True),
        },
        openapi_extra=json_request(drains.DrainRequest, {"reason": "SecurityUpdate", "maxParallel": 2}),
    )
    def drain_host(name: HostName, principal: Caller, body: JsonBody, request: Request) -> JSONResponse:
        parsed: drains.DrainRequest = _parse(drains.DrainRequest, body, "drain request")

        def run(s: Session) -> tuple[Drain, dict[str, Any]]:
            _fleet_operator(principal)
            notice = ctl.maintenance.notice_s if parsed.notice_seconds is None else parsed.notice_seconds
            drain = drains.start_drain(
                s, name, DrainReason(parsed.reason), max_parallel=parsed.max_parallel, notice_s=notice
            )
            return drain, drains.drain_view(s, drain)

        drain, view = ctl.transaction(run)
        ctl.drains.wake.set()
        return drain_response(drain, view, 202, str(request.base_url).rstrip("/"))

    @router.get(
        _HOSTS + "/{name}/drain",
        operation_id="get_host_drain",
        summary="the host's latest drain: each VM's ladder step, progress and outcome",
        responses={200: {"model": DrainView, "description": "the drain"}, **refusals(404)},
    )
    def get_host_drain(name: HostName, principal: Caller) -> Any:
        def run(s: Session) -> dict[str, Any]:
            authorize(principal, Action.READ)
            drain = drains.latest_drain(s, name)
            if drain is None:
                raise NotFound(f"host {name!r} has no drain")
            return drains.drain_view(s, drain)

        return ctl.transaction(run, write=False)

    @router.post(
        _HOSTS + "/{name}/drain/cancel",
        operation_id="cancel_host_drain",
        summary="cancel the host's running drain: moves in flight finish, no new step starts",
        responses={200: {"model": DrainView, "description": "canceling"}, **refusals(404, 409)},
    )
    def cancel_host_drain(name: HostName, principal: Caller) -> Any:
        def run(s: Session) -> dict[str, Any]:
            _fleet_operator(principal)
            return drains.drain_view(s, drains.cancel_drain(s, name))

        view = ctl.transaction(run)
        ctl.drains.wake.set()
        return view

    @router.post(
        _HOSTS + "/{name}/cordon",
        operation_id="cordon_host",
        summary="make a host no placement target (its VMs stay; idempotent): before maintenance run outside a drain",
        responses={200: {"model": ArmResource, "description": "the host"}, **refusals(404, body=True)},
        openapi_extra=json_request(
            drains.CordonRequest, {"reason": "rolling SecurityUpdate of fault domain fd0"}, required=False
        ),
    )
    def cordon_host(name: HostName, principal: Caller, body: OptionalBody) -> Any:
        parsed: drains.CordonRequest = _parse(drains.CordonRequest, body, "cordon request")

        def run(s: Session) -> dict[str, Any]:
            _fleet_operator(principal)
            return ctl.inventory.resource(s, drains.cordon(s, name, parsed.reason))

        return ctl.transaction(run)

    @router.post(
        _HOSTS + "/{name}/uncordon",
        operation_id="uncordon_host",
        summary="make a cordoned host a placement target again (409 while a drain of it runs)",
        responses={200: {"model": ArmResource, "description": "the host"}, **refusals(404, 409)},
    )
    def uncordon_host(name: HostName, principal: Caller) -> Any:
        def run(s: Session) -> dict[str, Any]:
            _fleet_operator(principal)
            return ctl.inventory.resource(s, drains.uncordon(s, name))

        return ctl.transaction(run)

    @router.get(
        _DRAINS,
        operation_id="list_drains",
        summary="drains, newest first (active=true: only those still running)",
        responses={200: {"model": DrainList, "description": "the drains"}, **refusals()},
    )
    def list_drains(principal: Caller, active: bool = False, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> Any:
        def run(s: Session) -> dict[str, Any]:
            authorize(principal, Action.READ)
            return {"value": drains.list_drains(s, active_only=active, limit=limit)}

        return ctl.transaction(run, write=False)

    @router.get(
        _DRAINS + "/{drain_id}",
        operation_id="get_drain",
        summary="one drain by its id",
        responses={200: {"model": DrainView, "description": "the drain"}, **refusals(404)},
    )
    def get_drain(drain_id: DrainId, principal: Caller) -> Any:
        def run(s: Session) -> dict[str, Any]:
            authorize(principal, Action.READ)
            drain = s.get(Drain, drain_id)
            if drain is None:
                raise NotFound(f"drain {drain_id} does not exist")
            return drains.drain_view(s, drain)

        return ctl.transaction(run, write=False)

    # -- windows -----------------------------------------------------------------------------------

    @router.put(
        _WINDOWS + "/{name}",
        operation_id="put_maintenance_window",
        summary="schedule a maintenance window: its hosts are drained one by one once it opens",
        status_code=201,
        responses={201: {"model": WindowView, "description": "scheduled"}, **refusals(404, 409, body=True)},
        openapi_extra=json_request(
            windows.WindowRequest,
            {"hosts": ["host-a"], "start": "2026-12-05T22:00:00Z", "duration": "PT2H", "reason": "SecurityUpdate"},
        ),
    )
    def put_window(name: WindowName, principal: Caller, body: JsonBody) -> Any:
        parsed: windows.WindowRequest = _parse(windows.WindowRequest, body, "maintenance window")

        def run(s: Session) -> dict[str, Any]:
            _fleet_operator(principal)
            return windows.window_view(windows.create_window(s, name, parsed, ctl.maintenance.notice_s))

        return JSONResponse(ctl.transaction(run), status_code=201)

    @router.get(
        _WINDOWS,
        operation_id="list_maintenance_windows",
        summary="the maintenance windows",
        responses={200: {"model": WindowList, "description": "the windows"}, **refusals()},
    )
    def list_windows(principal: Caller) -> Any:
        def run(s: Session) -> dict[str, Any]:
            authorize(principal, Action.READ)
            rows = s.query(MaintenanceWindow).order_by(MaintenanceWindow.start)
            return {"value": [windows.window_view(w) for w in rows]}

        return ctl.transaction(run, write=False)

    @router.get(
        _WINDOWS + "/{name}",
        operation_id="get_maintenance_window",
        summary="one maintenance window",
        responses={200: {"model": WindowView, "description": "the window"}, **refusals(404)},
    )
    def get_window(name: WindowName, principal: Caller) -> Any:
        def run(s: Session) -> dict[str, Any]:
            authorize(principal, Action.READ)
            window = s.get(MaintenanceWindow, name)
            if window is None:
                raise NotFound(f"maintenance window {name!r} does not exist")
            return windows.window_view(window)

        return ctl.transaction(run, write=False)

    @router.delete(
        _WINDOWS + "/{name}",
        operation_id="cancel_maintenance_window",
        summary="delete a window: no further host is drained (a drain it already started goes on)",
        responses={200: {"model": WindowView, "description": "deleted: its last state"}, **refusals(404)},
    )
    def cancel_window(name: WindowName, principal: Caller) -> Any:
        def run(s: Session) -> dict[str, Any]:
            _fleet_operator(principal)
            return windows.delete_window(s, name)

        return ctl.transaction(run)

    # -- a VM's Scheduled Events ---------------------------------------------------------------------

    @router.get(
        _VMS + "/{name}/scheduledEvents",
        operation_id="get_vm_scheduled_events",
        summary="the VM's Scheduled Events document (IMDS's shape)",
        responses={200: {"model": ScheduledEventsView, "description": "the document"}, **refusals(404)},
    )
    def get_scheduled_events(sub: Sub, rg: Rg, name: VmName, principal: Caller) -> Any:
        def run(s: Session) -> dict[str, Any]:
            authorize(principal, Action.READ, sub)
            return se.document(s, ctl.vms.get(s, sub, rg, name).id)

        return ctl.transaction(run, write=False)

    @router.post(
        _VMS + "/{name}/scheduledEvents",
        operation_id="approve_vm_scheduled_events",
        summary="approve Scheduled events early (StartRequests): each starts without waiting for NotBefore",
        responses={200: {"model": ScheduledEventsView, "description": "approved"}, **refusals(404, body=True)},
        openapi_extra=json_request(StartRequests, {"StartRequests": [{"EventId": _EVENT_EXAMPLE}]}),
    )
    def approve_scheduled_events(sub: Sub, rg: Rg, name: VmName, principal: Caller, body: JsonBody) -> Any:
        parsed: StartRequests = _parse(StartRequests, body, "StartRequests")

        def run(s: Session) -> dict[str, Any]:
            authorize(principal, Action.WRITE_VM, sub)
            vm = ctl.vms.get(s, sub, rg, name)
            se.approve(s, vm.id, [r.EventId for r in parsed.StartRequests], "owner")
            return se.document(s, vm.id)

        answer = ctl.transaction(run)
        ctl.drains.wake.set()
        return answer
