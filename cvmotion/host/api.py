"""host layer: the host API (HTTP, OpenAPI at ``/openapi.json``) — a thin shell over ``HostDaemon``.

Handlers only parse requests into daemon calls; errors become ``{"error": {"kind", "message"}}`` with a
status per class (400 bad input, 404 not found, 409 conflict, 422 policy violation, 500 otherwise).
Bound to loopback (or a test network namespace) only. The host-to-host calls (``/v1/migrations/incoming``,
``/v1/migrations/{id}/outcome``) need a request signed with a pool-issued host credential (``host.peers``); the
operator's calls carry no authentication on this interface yet.
"""

from __future__ import annotations

import asyncio
import base64
import json
import queue
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from cvmotion.abi.wire import MAX_PAGES_PER_BUNDLE
from cvmotion.errors import (
    AbiError,
    Conflict,
    CvmError,
    Moved,
    NotFound,
    PolicyViolation,
    Unauthorized,
    UsageError,
    VerificationError,
)
from cvmotion.host.daemon import DEFAULT_GUEST_POLICY, HostDaemon
from cvmotion.ipc.names import NAME_PATTERN
from cvmotion.migration.options import MigrationOptions
from cvmotion.vmm.layout import MIN_MEMORY
from cvmotion.vmm.sku import MAX_SKU_MEMORY, MAX_SKU_VCPUS, find_sku, parse_memory

__all__ = ["create_app"]

MAX_BODY = 1 << 20


class CreateVm(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    image: str = Field(min_length=1, max_length=4096)
    memory: str | int | None = None
    size: str | None = None
    vcpus: int | None = Field(default=None, ge=1, le=128)
    cmdline: str = Field(default="", max_length=3000)
    backend: str | None = Field(default=None, pattern="^(kvm|emulated)$")
    policy: int = DEFAULT_GUEST_POLICY
    migration_policy: str | None = None  # base64 of a canonical MigrationPolicy document
    key_name: str | None = Field(default=None, pattern="^[A-Za-z0-9._-]{1,64}$")  # data key at the key-release service


class KvRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    op: str = Field(pattern="^(get|put|delete|stats|GET|PUT|DELETE|STATS)$")
    key: str = Field(default="", max_length=64)  # required by get, put and delete; stats takes none
    value: str = Field(default="", max_length=1024)


class MigrateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    destination: str = Field(min_length=1, max_length=2048)
    downtime_limit_ms: float = Field(default=300.0, gt=0, le=60_000)
    streams: int = Field(default=2, ge=1, le=16)
    max_rounds: int = Field(default=30, ge=1, le=1000)
    auto_converge: bool = True
    pages_per_bundle: int = Field(default=MAX_PAGES_PER_BUNDLE, ge=1, le=MAX_PAGES_PER_BUNDLE)
    # How long either side waits on a silent peer before it gives up (bounded verdicts on a partition).
    io_timeout_s: float = Field(default=30.0, gt=0, le=600)
    commit_timeout_s: float = Field(default=60.0, gt=0, le=3600)


class IncomingSpec(BaseModel):
    """The VM's spec as the source sends it: bounded, and named as the VM it describes."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    memory: int = Field(ge=MIN_MEMORY, le=MAX_SKU_MEMORY)
    vcpus: int = Field(default=1, ge=1, le=MAX_SKU_VCPUS)
    image: str = Field(default="", max_length=4096)
    cmdline: str = Field(default="", max_length=3000)
    backend: str | None = Field(default=None, pattern="^(kvm|emulated)$")
    mode: str = Field(default="incoming", pattern="^(launch|incoming)$")  # always "incoming" here
    attestation_url: str | None = Field(default=None, max_length=2048)  # replaced by this host's services
    key_release_url: str | None = Field(default=None, max_length=2048)
    key_name: str | None = Field(default=None, pattern="^[A-Za-z0-9._-]{1,64}$")


class IncomingMigration(BaseModel):
    """``POST /v1/migrations/incoming``: a source host asks this host to receive a VM."""

    model_config = ConfigDict(extra="forbid")

    vm: str = Field(pattern=NAME_PATTERN)
    spec: IncomingSpec
    session_id: str = Field(pattern="^[0-9a-f]{32}$")
    options: dict[str, Any] = Field(default_factory=dict)
    source: str = Field(default="", max_length=63)
    source_migration: str = Field(default="", pattern="^[0-9a-f]{0,32}$")
    policy: int = Field(default=DEFAULT_GUEST_POLICY, ge=0, lt=1 << 64)
    migration_policy: str = Field(default="", max_length=65536)
    measurement: str = Field(default="", pattern="^([0-9a-f]{96})?$")


def _status_for(exc: CvmError) -> int:
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, Unauthorized):
        return 401
    if isinstance(exc, Conflict):
        return 409
    if isinstance(exc, PolicyViolation):
        return 422
    if isinstance(exc, (UsageError, AbiError, VerificationError)):
        return 400
    return 500


def _problems(errors: Sequence[Any]) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors) or "invalid request"


def _error(status: int, kind: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"kind": kind, "message": message, **extra}}, status_code=status)


def create_app(daemon: HostDaemon) -> FastAPI:
    app = FastAPI(title=f"cvmotion host API ({daemon.config.name})", version="1")

    @app.exception_handler(CvmError)
    async def _cvm_error(request: Request, exc: CvmError) -> JSONResponse:
        if isinstance(exc, Moved):
            # 307 keeps the method and body: a client that follows redirects reaches the VM on its new host.
            suffix = request.url.path.removeprefix(f"/v1/vms/{request.path_params.get('name', '')}")
            location = exc.location + suffix
            response = _error(307, "Moved", str(exc), location=location)
            response.headers["Location"] = location
            return response
        extra = {"violations": exc.violations} if isinstance(exc, PolicyViolation) else {}
        return _error(_status_for(exc), type(exc).__name__, str(exc), **extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, "UsageError", _problems(exc.errors()))

    @app.middleware("http")
    async def _limit_body(request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return _error(413, "UsageError", f"request body over {MAX_BODY} bytes")
        return await call_next(request)

    @app.get("/v1/host")
    async def host() -> dict[str, Any]:
        return daemon.host_info()

    @app.get("/v1/vms")
    async def list_vms() -> dict[str, Any]:
        return {"vms": await run_in_threadpool(daemon.list_vms)}

    @app.post("/v1/vms", status_code=201)
    async def create_vm(body: CreateVm) -> dict[str, Any]:
        if (body.memory is None) == (body.size is None):
            raise UsageError("give exactly one of memory (e.g. 64M, 1G) or size (an SKU such as Standard_DC2as_v5)")
        vcpus = body.vcpus or 1
        if body.size is not None:
            sku = find_sku(body.size)
            memory = sku.memory
            vcpus = body.vcpus or sku.vcpus
        else:
            memory = parse_memory(str(body.memory))
        doc = base64.b64decode(body.migration_policy) if body.migration_policy else None
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

    @app.get("/v1/vms/{name}")
    async def get_vm(name: str) -> dict[str, Any]:
        return await run_in_threadpool(lambda: daemon.vm_info(daemon.get_vm(name)))

    @app.delete("/v1/vms/{name}")
    async def delete_vm(name: str) -> dict[str, Any]:
        await run_in_threadpool(daemon.delete_vm, name)
        return {"deleted": name}

    @app.get("/v1/vms/{name}/attestation")
    async def attestation(name: str) -> dict[str, Any]:
        return await run_in_threadpool(daemon.attestation, name)

    @app.get("/v1/vms/{name}/console")
    async def console(name: str, since: int = 0) -> dict[str, Any]:
        return await run_in_threadpool(daemon.console, name, since)

    @app.post("/v1/vms/{name}/kv")
    async def kv(name: str, body: KvRequest) -> dict[str, Any]:
        result = await run_in_threadpool(daemon.kv, name, body.op, body.key.encode(), body.value.encode())
        if "slots" in result:
            return result
        value = result["value"]
        return {"status": result["status"], "value": value.decode("utf-8", "replace") if value else None}

    @app.post("/v1/vms/{name}/migrate", status_code=202)
    async def migrate(name: str, body: MigrateRequest) -> dict[str, Any]:
        options = MigrationOptions(
            downtime_limit_ms=body.downtime_limit_ms,
            streams=body.streams,
            max_rounds=body.max_rounds,
            auto_converge=body.auto_converge,
            pages_per_bundle=body.pages_per_bundle,
            setup_timeout=body.io_timeout_s,
            io_timeout=body.io_timeout_s,
            commit_timeout=body.commit_timeout_s,
        )
        stats = await run_in_threadpool(daemon.migrate, name, body.destination, options)
        return {"migration": stats.id, **stats.query_migrate()}

    @app.get("/v1/migrations")
    async def migrations() -> dict[str, Any]:
        return {"migrations": [m.query_migrate() for m in list(daemon.migrations.values())]}

    @app.get("/v1/migrations/{mig_id}")
    async def migration(mig_id: str) -> dict[str, Any]:
        return daemon.migration(mig_id).query_migrate()

    @app.post("/v1/migrations/{mig_id}/cancel")
    async def cancel(mig_id: str) -> dict[str, Any]:
        daemon.cancel(mig_id)
        return {"cancelled": mig_id}

    @app.post("/v1/migrations/incoming")
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

    @app.get("/v1/migrations/{mig_id}/outcome")
    async def outcome(request: Request, mig_id: str) -> dict[str, Any]:
        daemon.peers.verify(request.method, request.url.path, b"", request.headers)
        return daemon.outcome(mig_id)

    @app.get("/v1/events")
    async def events(request: Request, limit: int = 100, follow: bool = False) -> Any:
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
