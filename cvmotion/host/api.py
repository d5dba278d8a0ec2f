"""host layer: the host API (HTTP, OpenAPI at ``/openapi.json``) — a thin shell over ``HostDaemon``.

Handlers only parse requests into daemon calls; errors become ``{"error": {"kind", "message"}}`` with a
status per class (400 bad input, 401 unauthenticated, 404 not found, 409 conflict, 307 moved, 500
otherwise), and every operation's document lists the ones it can answer (``host.api_schema``).
Bound to loopback (or a test network namespace) only. The host-to-host calls (``/v1/migrations/incoming``,
``/v1/migrations/{id}/outcome``) need a request signed with a pool-issued host credential (``host.peers``),
checked before anything else, so an unsigned request gets 401 whatever it carries; the operator's calls
carry no authentication on this interface yet.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import queue
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any

import httpx
from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor

from cvmotion.abi.sku import find_sku, parse_memory
from cvmotion.errors import (
    AbiError,
    Conflict,
    CvmError,
    DeviceError,
    FirmwareError,
    ImageError,
    Moved,
    NotFound,
    PolicyViolation,
    Unauthorized,
    UsageError,
    VerificationError,
)
from cvmotion.host import api_maintenance
from cvmotion.host import api_schema as schema
from cvmotion.host.api_schema import MAX_BODY, CreateVm, IncomingMigration, KvRequest, MigrateRequest, refusals
from cvmotion.host.daemon import HostDaemon
from cvmotion.ipc.body_limit import ContentLengthGate
from cvmotion.ipc.envelope import error_body
from cvmotion.ipc.names import NAME_PATTERN
from cvmotion.ipc.openapi import inline_schema, install_error_handlers
from cvmotion.ipc.validation import describe_problems

__all__ = ["create_app"]

log = logging.getLogger("cvmotion.host.api")

MAX_WAIT_S = 30.0  # the longest long-poll a caller may ask for (well inside any client's read timeout)
_LONG_POLL_TICK_S = 0.005

VmName = Annotated[str, Path(pattern=NAME_PATTERN, examples=["web-1"], description="the VM's name")]
MigrationId = Annotated[str, Path(pattern=schema.MIGRATION_ID_PATTERN, examples=["3f2a9c1d0b7e"])]
WaitSeconds = Annotated[
    float, Query(ge=0.0, le=MAX_WAIT_S, description="long-poll: answer when the migration settles or after this long")
]


class _MigrationIdConvertor(Convertor[str]):
    """A migration id in a path: ``GET /v1/migrations/incoming`` is then no migration's, and answers 405."""

    regex = schema.MIGRATION_ID_PATTERN.strip("^$")

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("migration_id", _MigrationIdConvertor())


def _status_for(exc: CvmError) -> int:
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, Unauthorized):
        return 401
    if isinstance(exc, (Conflict, DeviceError)):  # DeviceError: the guest did not answer (busy, or no kvstore)
        return 409
    if isinstance(exc, (UsageError, AbiError, VerificationError, PolicyViolation, ImageError, FirmwareError)):
        return 400  # ImageError: no such image; FirmwareError: the SP refused the request as given (policy)
    return 500


def _dialable(url: str) -> str:
    """``url`` if this host can dial it (httpx parses it, its host name encodes as IDNA), else ``UsageError``."""
    try:
        httpx.URL(url).host.encode("idna")
    except (httpx.InvalidURL, ValueError) as exc:  # UnicodeError: a label over 63 characters
        raise UsageError(f"destination {url[:200]!r} is not a URL this host can dial: {exc}") from None
    return url


def _problems(errors: Sequence[Any]) -> str:
    return describe_problems(errors) or "invalid request"


def _error(status: int, kind: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse(error_body(kind, message, **extra), status_code=status)


_VM_LINKS = {
    f"{verb}_vm": {"operationId": op, "parameters": {"name": "$response.body#/name"}, "description": text}
    for verb, op, text in (
        ("show", "get_vm", "the VM just created"),
        ("delete", "delete_vm", "delete the VM just created"),
        ("console", "vm_console", "its console"),
    )
}
_CREATE_EXAMPLE = {"name": "web-1", "image": "memdirty", "memory": "64M"}


def create_app(daemon: HostDaemon) -> FastAPI:
    app = FastAPI(
        title="cvmotion host API",
        description=f"Host {daemon.config.name}: its confidential VMs and their live migrations.",
        version="1",
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(app)  # 404 for unknown paths, 405 with every method of the path in Allow
    api_maintenance.install(app, daemon)

    @app.exception_handler(CvmError)
    async def _cvm_error(request: Request, exc: CvmError) -> JSONResponse:
        if isinstance(exc, Moved):
            # 307 keeps the method and body: a client that follows redirects reaches the VM on its new host.
            suffix = request.url.path.removeprefix(f"/v1/vms/{request.path_params.get('name', '')}")
            location = exc.location + suffix
            response = _error(307, "Moved", str(exc))
            response.headers["Location"] = location
            return response
        extra = {"violations": exc.violations} if isinstance(exc, PolicyViolation) else {}
        return _error(_status_for(exc), type(exc).__name__, str(exc), **extra)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        # A bug, never bad input: the envelope for the client; Starlette re-raises, so the server logs it.
        log.error("%s %s failed: %r", request.method, request.url.path, exc)
        return _error(500, "InternalError", "internal error (see the host log)")

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, "UsageError", _problems(exc.errors())[:1000])

    def _limit_body(length: str | None) -> JSONResponse | None:
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return _error(413, "UsageError", f"request body over {MAX_BODY} bytes")
        return None

    app.add_middleware(ContentLengthGate, judge=_limit_body)

    def ok(model: type[BaseModel], description: str, status: int = 200, **extra: Any) -> dict[int | str, Any]:
        return {status: {"model": model, "description": description, **extra}}

    @app.get(
        "/v1/host",
        operation_id="host_info",
        response_model=None,
        responses=ok(schema.HostInfo, "this host and its chip"),
    )
    async def host() -> dict[str, Any]:
        return daemon.host_info()

    @app.get(
        "/v1/vms", operation_id="list_vms", response_model=None, responses=ok(schema.VmList, "the VMs on this host")
    )
    async def list_vms() -> dict[str, Any]:
        return {"vms": await run_in_threadpool(daemon.list_vms)}

    @app.post(
        "/v1/vms",
        status_code=201,
        operation_id="create_vm",
        response_model=None,
        summary="launch a confidential VM",
        responses={
            **ok(schema.VmInfo, "the VM, running", 201, links=_VM_LINKS),
            **refusals(409, 413, s400=("ImageError", "FirmwareError")),
        },
        openapi_extra={"requestBody": {"content": {"application/json": {"example": _CREATE_EXAMPLE}}}},
    )
    async def create_vm(body: CreateVm) -> dict[str, Any]:
        vcpus = body.vcpus or 1
        if body.size is not None:
            sku = find_sku(body.size)
            memory = sku.memory
            vcpus = body.vcpus or sku.vcpus
        else:
            memory = body.memory if isinstance(body.memory, int) else parse_memory(str(body.memory))
        try:
            doc = base64.b64decode(body.migration_policy, validate=True) if body.migration_policy else None
        except binascii.Error:
            raise UsageError("migration_policy: not base64") from None
        record = await run_in_threadpool(
            lambda: daemon.create_vm(
                name=body.name,
                image=body.image,
                memory=memory,
                vcpus=vcpus,
                cmdline=body.cmdline,
                backend=body.backend,
                policy=body.policy,
                migration_policy=doc,
                key_name=body.key_name,
            )
        )
        return daemon.vm_info(record)

    @app.get(
        "/v1/vms/{name}",
        operation_id="get_vm",
        response_model=None,
        responses={**ok(schema.VmInfo, "the VM"), **refusals(404)},
    )
    async def get_vm(name: VmName) -> dict[str, Any]:
        return await run_in_threadpool(lambda: daemon.vm_info(daemon.get_vm(name)))

    @app.delete(
        "/v1/vms/{name}",
        operation_id="delete_vm",
        response_model=None,
        summary="stop the VM and decommission its guest context",
        description="A VM whose migration has not settled (migrating, awaiting its destination, arriving) is"
        " refused with 409 until it has; `force=true` stops it anyway.",
        responses={**ok(schema.Deleted, "deleted"), **refusals(404, 409)},
    )
    async def delete_vm(
        name: VmName,
        force: Annotated[bool, Query(description="stop the VM even while its migration has not settled")] = False,
    ) -> dict[str, Any]:
        await run_in_threadpool(lambda: daemon.delete_vm(name, force=force))
        return {"deleted": name}

    @app.get(
        "/v1/vms/{name}/attestation",
        operation_id="vm_attestation",
        response_model=None,
        summary="the paravisor's current attestation token and its claims (empty before it attested)",
        responses={200: {"description": "token and claims"}, **refusals(404, 409)},
    )
    async def attestation(name: VmName) -> dict[str, Any]:
        return await run_in_threadpool(daemon.attestation, name)

    @app.get(
        "/v1/vms/{name}/console",
        operation_id="vm_console",
        response_model=None,
        responses={**ok(schema.Console, "console lines from since on"), **refusals(404, 409)},
    )
    async def console(name: VmName, since: Annotated[int, Query(ge=0, le=1 << 40)] = 0) -> dict[str, Any]:
        return await run_in_threadpool(daemon.console, name, since)

    @app.post(
        "/v1/vms/{name}/kv",
        operation_id="vm_kv",
        response_model=None,
        summary="one request to a kvstore guest (its cvm-io device)",
        responses={**ok(schema.KvAnswer, "the guest's answer"), **refusals(307, 404, 409, 413)},
        openapi_extra={"requestBody": {"content": {"application/json": {"example": {"op": "get", "key": "k"}}}}},
    )
    async def kv(name: VmName, body: KvRequest) -> dict[str, Any]:
        key, value = body.key.encode(), body.value.encode()
        result = await run_in_threadpool(daemon.kv, name, body.op, key, value)
        if "slots" in result:
            return result
        value = result["value"]
        return {"status": result["status"], "value": value.decode("utf-8", "replace") if value else None}

    @app.post(
        "/v1/vms/{name}/migrate",
        status_code=202,
        operation_id="migrate_vm",
        response_model=None,
        summary="start a live migration to another host (unreachable or refusing destination: 400)",
        responses={**ok(schema.MigrationStarted, "started: poll /v1/migrations/{id}", 202), **refusals(404, 409, 413)},
        openapi_extra={
            "requestBody": {"content": {"application/json": {"example": {"destination": "http://127.0.0.1:1"}}}}
        },
    )
    async def migrate(name: VmName, body: MigrateRequest) -> dict[str, Any]:
        stats = await run_in_threadpool(daemon.migrate, name, _dialable(body.destination), body.options())
        return {"migration": stats.id, **stats.query_migrate()}

    @app.get(
        "/v1/migrations",
        operation_id="list_migrations",
        response_model=None,
        responses=ok(schema.MigrationList, "every migration this daemon ran or runs"),
    )
    async def migrations() -> dict[str, Any]:
        return {"migrations": [m.query_migrate() for m in list(daemon.migrations.values())]}

    @app.get(
        "/v1/migrations/{mig_id:migration_id}",
        operation_id="get_migration",
        response_model=None,
        summary="a migration's progress; with wait=S, answered when it settles or S seconds pass (long-poll)",
        responses={**ok(schema.Migration, "its progress (QEMU query-migrate)"), **refusals(404)},
    )
    async def migration(mig_id: MigrationId, wait: WaitSeconds = 0.0) -> dict[str, Any]:
        stats = daemon.migration(mig_id)
        # A long-poll, so a controller learns a move's end within a few milliseconds with one request instead
        # of a request per poll interval.  The check is in this process (a status read, no I/O), on the event
        # loop: no thread is held while it waits.
        clock = asyncio.get_running_loop().time
        deadline = clock() + wait
        while not stats.status.settled and clock() < deadline:
            await asyncio.sleep(min(_LONG_POLL_TICK_S, max(0.0, deadline - clock())))
        return stats.query_migrate()

    @app.post(
        "/v1/migrations/{mig_id}/cancel",
        operation_id="cancel_migration",
        response_model=None,
        summary="cancel an outgoing migration (the VM stays on this host)",
        responses={**ok(schema.Cancelled, "cancel requested"), **refusals(404)},
    )
    async def cancel(mig_id: MigrationId) -> dict[str, Any]:
        daemon.cancel(mig_id)
        return {"cancelled": mig_id}

    incoming_body = {"required": True, "content": {"application/json": {"schema": inline_schema(IncomingMigration)}}}

    @app.post(
        "/v1/migrations/incoming",
        operation_id="incoming_migration",
        response_model=None,
        summary="host to host: receive a VM (signed by a pool host credential)",
        responses={**ok(schema.IncomingAccepted, "where the source connects"), **refusals(401, 409, 413)},
        openapi_extra={"parameters": schema.PEER_HEADERS, "requestBody": incoming_body},
    )
    async def incoming(request: Request) -> dict[str, Any]:
        body = await request.body()
        daemon.peers.verify(request.method, request.url.path, body, request.headers)
        try:
            parsed = IncomingMigration.model_validate_json(body)
        except ValidationError as exc:
            raise UsageError(_problems(exc.errors())) from None
        if parsed.spec.name != parsed.vm:
            raise UsageError(f"spec.name {parsed.spec.name!r} is not the VM {parsed.vm!r} being migrated")
        return await run_in_threadpool(daemon.incoming, parsed.model_dump())

    mig_id_parameter = {
        "name": "mig_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": schema.MIGRATION_ID_PATTERN},
        "description": "the destination's id of the incoming migration",
    }

    @app.get(
        "/v1/migrations/{mig_id}/outcome",
        operation_id="migration_outcome",
        response_model=None,
        summary="host to host: the verdict of an incoming migration (signed by a pool host credential)",
        responses={**ok(schema.Outcome, "the verdict"), **refusals(401, 404)},
        openapi_extra={"parameters": [mig_id_parameter, *schema.PEER_HEADERS]},
    )
    async def outcome(request: Request) -> dict[str, Any]:
        # Authentication first: the id is read (and checked) only for a signed request.
        daemon.peers.verify(request.method, request.url.path, b"", request.headers)
        return daemon.outcome(str(request.path_params["mig_id"]))

    @app.get(
        "/v1/events",
        operation_id="events",
        response_model=None,
        summary="recent events (CloudEvents); follow=true streams them as server-sent events",
        responses={
            200: {
                "model": schema.EventList,
                "description": "the last limit events, or with follow=true an endless text/event-stream",
                "content": {"text/event-stream": {"schema": inline_schema(schema.ServerSentEvent)}},
            },
            **refusals(),
        },
    )
    async def events(
        request: Request, limit: Annotated[int, Query(ge=1, le=10_000)] = 100, follow: bool = False
    ) -> Any:
        if not follow:
            return {"events": daemon.events.recent(limit)}
        sub = daemon.events.subscribe()

        async def stream() -> AsyncIterator[bytes]:
            try:
                for event in daemon.events.recent(limit):
                    yield f"data: {json.dumps(event)}\n\n".encode()
                while not await request.is_disconnected():
                    try:
                        event = await asyncio.to_thread(sub.get, True, 1.0)
                    except queue.Empty:
                        yield b": keep-alive\n\n"
                        continue
                    yield f"data: {json.dumps(event)}\n\n".encode()
            finally:
                daemon.events.unsubscribe(sub)

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app
