"""host layer: the host API's maintenance and Scheduled Events operations (installed by ``host.api``).

``POST /v1/host/maintenance`` runs a memory-preserving update in place (``host.maintenance``) and
``GET /v1/host/maintenance/{id}`` answers its record.  ``PUT/GET /v1/vms/{name}/scheduledevents`` are the
controller's side of a VM's Scheduled Events document; ``GET/POST /v1/vms/{name}/metadata/scheduledevents``
the guest's, shaped as Azure IMDS's ``/metadata/scheduledevents`` (``host.scheduled_events``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import FastAPI, Path
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from cvmotion.host.api_schema import refusals
from cvmotion.host.maintenance import Maintenance, MaintenanceAccepted, MaintenanceRequest
from cvmotion.host.scheduled_events import ScheduledEventsDocument, ScheduledEventsRecord, StartRequests
from cvmotion.ipc.names import NAME_PATTERN

if TYPE_CHECKING:
    from cvmotion.host.daemon import HostDaemon

__all__ = ["install"]

VmName = Annotated[str, Path(pattern=NAME_PATTERN, examples=["web-1"], description="the VM's name")]
MaintenanceId = Annotated[str, Path(pattern=NAME_PATTERN, examples=["upd-1"], description="the maintenance's id")]


def _ok(model: type[BaseModel], description: str, status: int = 200) -> dict[int | str, Any]:
    return {status: {"model": model, "description": description}}


def install(app: FastAPI, daemon: HostDaemon) -> None:
    @app.post(
        "/v1/host/maintenance",
        status_code=202,
        operation_id="start_maintenance",
        response_model=None,
        summary="pause every VM, replace the host daemon and the platform process under them, resume them",
        description="The same id again answers the same record; another id while one is in progress, or while a VM"
        " migrates, is 409. While the daemon hands over to its successor its port may refuse connections for a"
        " moment: poll `GET /v1/host/maintenance/{id}`.",
        responses={**_ok(MaintenanceAccepted, "started (or the record of this id)", 202), **refusals(409, 413)},
        openapi_extra={
            "requestBody": {
                "content": {"application/json": {"example": {"id": "upd-1", "kind": "MemoryPreservingUpdate"}}}
            }
        },
    )
    async def start_maintenance(body: MaintenanceRequest) -> dict[str, Any]:
        record = await run_in_threadpool(daemon.maintenance.request, body)
        return {"id": record.id, "kind": record.kind, "status": record.status.value}

    @app.get(
        "/v1/host/maintenance/{maintenance_id}",
        operation_id="get_maintenance",
        response_model=None,
        responses={**_ok(Maintenance, "the maintenance: per VM the pause and the re-attestation"), **refusals(404)},
    )
    async def get_maintenance(maintenance_id: MaintenanceId) -> dict[str, Any]:
        record = await run_in_threadpool(daemon.maintenance.get, maintenance_id)
        return record.answer().model_dump(mode="json")

    @app.put(
        "/v1/vms/{name}/scheduledevents",
        operation_id="put_scheduled_events",
        response_model=None,
        summary="publish the VM's Scheduled Events document (a lower DocumentIncarnation than stored: 409)",
        responses={**_ok(ScheduledEventsDocument, "the stored document"), **refusals(404, 409, 413)},
    )
    async def put_scheduled_events(name: VmName, body: ScheduledEventsDocument) -> dict[str, Any]:
        document = await run_in_threadpool(daemon.put_scheduled_events, name, body)
        return document.model_dump(mode="json")

    @app.get(
        "/v1/vms/{name}/scheduledevents",
        operation_id="get_scheduled_events",
        response_model=None,
        summary="the VM's document and the guest's early approvals of events it still lists",
        responses={**_ok(ScheduledEventsRecord, "document and startRequests"), **refusals(404)},
    )
    async def get_scheduled_events(name: VmName) -> dict[str, Any]:
        record = await run_in_threadpool(daemon.scheduled_events_record, name)
        return record.model_dump(mode="json")

    @app.get(
        "/v1/vms/{name}/metadata/scheduledevents",
        operation_id="guest_scheduled_events",
        response_model=None,
        summary="the guest's view (Azure IMDS /metadata/scheduledevents)",
        responses={**_ok(ScheduledEventsDocument, "the document"), **refusals(404)},
    )
    async def guest_scheduled_events(name: VmName) -> dict[str, Any]:
        record = await run_in_threadpool(daemon.scheduled_events_record, name)
        return record.document.model_dump(mode="json")

    @app.post(
        "/v1/vms/{name}/metadata/scheduledevents",
        operation_id="approve_scheduled_events",
        response_model=None,
        summary="the guest approves events early (an EventId not in the document: 400)",
        responses={**_ok(StartRequests, "every event the guest approved so far"), **refusals(404, 413)},
        openapi_extra={
            "requestBody": {"content": {"application/json": {"example": {"StartRequests": [{"EventId": "e-1"}]}}}}
        },
    )
    async def approve_scheduled_events(name: VmName, body: StartRequests) -> dict[str, Any]:
        approved = await run_in_threadpool(daemon.approve_scheduled_events, name, body)
        return {"StartRequests": [{"EventId": event_id} for event_id in approved]}
