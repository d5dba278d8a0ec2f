"""control layer: the controller's REST API (ARM-shaped; OpenAPI at ``/openapi.json``).

Handlers only parse requests and call the services inside one transaction.  Errors are
``{"error": {"code", "kind", "message"}}`` with ARM's codes: 400 InvalidRequestContent, 401
AuthenticationFailed, 403 AuthorizationFailed or RequestDisallowedByPolicy (naming the assignment),
404 ResourceNotFound, 409 Conflict, 503 DatabaseUnavailable.  Long-running requests answer 202 with an
``Azure-AsyncOperation`` header the client polls.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from cvmotion.control.auth import Action, Principal, authenticate, authorize
from cvmotion.control.db import ComplianceResult, Event, Operation, Vm
from cvmotion.control.errors import Forbidden, InvalidRequest, RequestDisallowedByPolicy, Unauthorized
from cvmotion.control.inventory import Heartbeat, HostRegistration
from cvmotion.control.operations import status_of
from cvmotion.control.policy_store import parse_scope
from cvmotion.control.resources import VmPatch, VmPut, check_name, rg_id, vm_id
from cvmotion.control.service import FleetController
from cvmotion.control.templates import expand_template
from cvmotion.errors import Conflict, CvmError, NotFound, UsageError

__all__ = ["create_app"]

log = logging.getLogger("cvmotion.control.api")
_STREAM_POLL_S = 0.25  # how often a follower's stream looks for new events (every replica sees every event)
_STREAM_LIMIT_S = 3600.0  # a follower reconnects after an hour (bounded streams; SSE clients resume)

MAX_BODY = 1 << 20
_VMS = "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines"
_POLICY = "providers/Microsoft.Authorization"
_HOSTS = "/providers/Cvmotion.Fabric/hosts"


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None


JsonBody = Annotated[Any, Depends(_json_body)]


def _caller(request: Request, authorization: Annotated[str | None, Header()] = None) -> Principal:
    """The request's principal; tokens are never revoked in place, so a per-app cache is safe."""
    tokens: dict[str, Principal] = request.app.state.tokens
    if authorization is not None and authorization in tokens:
        return tokens[authorization]
    ctl: FleetController = request.app.state.controller
    principal = ctl.transaction(lambda s: authenticate(s, authorization), write=False)
    tokens[str(authorization)] = principal
    return principal


Caller = Annotated[Principal, Depends(_caller)]


class MigrateBody(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    target_host: str | None = Field(default=None, alias="targetHost", max_length=63)


class AssignmentBody(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    class Properties(BaseModel):
        model_config = ConfigDict(extra="forbid", populate_by_name=True)
        policy_definition_id: str = Field(alias="policyDefinitionId", min_length=1, max_length=300)
        parameters: dict[str, Any] = Field(default_factory=dict)
        display_name: str = Field(default="", alias="displayName", max_length=256)

    properties: Properties


class DeploymentBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    class Properties(BaseModel):
        model_config = ConfigDict(extra="forbid")
        template: dict[str, Any]
        parameters: dict[str, Any] = Field(default_factory=dict)
        mode: str = Field(default="Incremental", pattern="^Incremental$")

    properties: Properties


def _envelope(status: int, code: str, kind: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "kind": kind, "message": message, **extra}}, status_code=status)


def _error_response(exc: CvmError) -> JSONResponse:
    kind = type(exc).__name__
    if isinstance(exc, RequestDisallowedByPolicy):
        return _envelope(
            403, "RequestDisallowedByPolicy", kind, str(exc), policyAssignment=exc.assignment, policy=exc.definition
        )
    if isinstance(exc, Unauthorized):
        return _envelope(401, "AuthenticationFailed", kind, str(exc))
    if isinstance(exc, Forbidden):
        return _envelope(403, "AuthorizationFailed", kind, str(exc))
    if isinstance(exc, NotFound):
        return _envelope(404, "ResourceNotFound", kind, str(exc))
    if isinstance(exc, Conflict):
        return _envelope(409, "Conflict", kind, str(exc))
    if isinstance(exc, UsageError):
        return _envelope(400, "InvalidRequestContent", kind, str(exc))
    return _envelope(500, "InternalServerError", kind, str(exc))


def _async(url: str, body: dict[str, Any], op: Operation | None, status: int = 202) -> JSONResponse:
    response = JSONResponse(body, status_code=status if op is not None else 200)
    if op is not None:
        location = f"{url}/subscriptions/{op.subscription}/providers/Cvmotion.Fabric/operations/{op.id}"
        response.headers["Azure-AsyncOperation"] = location
        response.headers["Location"] = location
        response.headers["Retry-After"] = "1"
    return response


def _parse(model: type[BaseModel], body: Any, what: str) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise InvalidRequest(f"{what}: {problems}") from None


def create_app(ctl: FleetController) -> FastAPI:  # noqa: C901 - one closure per route is the point
    app = FastAPI(title="cvmotion fleet controller", version="1")
    app.state.controller = ctl
    app.state.tokens = {}

    @app.exception_handler(CvmError)
    async def _cvm(_: Request, exc: CvmError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return _envelope(400, "InvalidRequestContent", "InvalidRequest", problems or "invalid request")

    @app.exception_handler(OperationalError)
    async def _db(_: Request, exc: OperationalError) -> JSONResponse:
        return _envelope(503, "DatabaseUnavailable", "DatabaseUnavailable", "the database is unavailable; retry")

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        # Never a traceback to the client; the log has it.
        log.exception("request failed", exc_info=exc)
        return _envelope(
            500, "InternalServerError", type(exc).__name__, "internal error; the controller log has details"
        )

    @app.middleware("http")
    async def _limit_body(request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return _envelope(413, "InvalidRequestContent", "InvalidRequest", f"request body over {MAX_BODY} bytes")
        return await call_next(request)

    def base(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"replica": ctl.replica, "leader": ctl.leader, "database": ctl.dialect}

    # -- virtual machines --------------------------------------------------------------------------

    @app.put(_VMS + "/{name}", status_code=202)
    def put_vm(request: Request, sub: str, rg: str, name: str, principal: Caller, body: JsonBody) -> JSONResponse:
        parsed = _parse(VmPut, body, "virtual machine")

        def run(s: Session) -> tuple[dict[str, Any], Operation | None]:
            authorize(principal, Action.WRITE_VM, sub)
            vm, op, _created = ctl.vms.put(s, sub, rg, name, parsed)
            return ctl.vms.resource(s, vm, eligibility=False), op

        resource, op = ctl.transaction(run)
        ctl.wake_workers()
        return _async(base(request), resource, op)

    @app.patch(_VMS + "/{name}")
    def patch_vm(sub: str, rg: str, name: str, principal: Caller, body: JsonBody) -> Any:
        parsed = _parse(VmPatch, body, "virtual machine patch")

        def run(s: Session) -> dict[str, Any]:
            authorize(principal, Action.WRITE_VM, sub)
            return ctl.vms.resource(s, ctl.vms.patch(s, sub, rg, name, parsed))

        return ctl.transaction(run)

    @app.get(_VMS + "/{name}")
    def get_vm(sub: str, rg: str, name: str, principal: Caller) -> Any:
        def run(s: Session) -> dict[str, Any]:
            authorize(principal, Action.READ, sub)
            return ctl.vms.resource(s, ctl.vms.get(s, sub, rg, name))

        return ctl.transaction(run, write=False)

    @app.get(_VMS)
    def list_vms(sub: str, rg: str, principal: Caller) -> Any:
        def run(s: Session) -> dict[str, Any]:
            authorize(principal, Action.READ, sub)
            return {"value": [ctl.vms.resource(s, vm) for vm in ctl.vms.list_vms(s, sub, rg)]}

        return ctl.transaction(run, write=False)

    @app.get("/subscriptions/{sub}/providers/Microsoft.Compute/virtualMachines")
    def list_sub_vms(sub: str, principal: Caller) -> Any:
        def run(s: Session) -> dict[str, Any]:
            authorize(principal, Action.READ, sub)
            return {"value": [ctl.vms.resource(s, vm) for vm in ctl.vms.list_vms(s, sub, None)]}

        return ctl.transaction(run, write=False)

    @app.delete(_VMS + "/{name}", status_code=202)
    def delete_vm(request: Request, sub: str, rg: str, name: str, principal: Caller) -> Any:
        def run(s: Session) -> Operation | None:
            authorize(principal, Action.WRITE_VM, sub)
            return ctl.vms.delete(s, sub, rg, name)

        op = ctl.transaction(run)
        ctl.wake_workers()
        return _async(base(request), {"deleting": name}, op)

    @app.post(_VMS + "/{name}/migrate", status_code=202)
    def migrate_vm(request: Request, sub: str, rg: str, name: str, principal: Caller, body: JsonBody) -> Any:
        parsed = _parse(MigrateBody, body or {}, "migrate request")

        def run(s: Session) -> Operation:
            authorize(principal, Action.MIGRATE, sub)
            return ctl.vms.migrate(s, sub, rg, name, parsed.target_host)

        op = ctl.transaction(run)
        ctl.wake_workers()
        return _async(base(request), {"operation": op.id, "targetHost": op.target_host}, op)

    def _operation_view(op: Operation) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": op.id,
            "name": op.kind.value,
            "status": status_of(op.step).value,
            "step": op.step.value,
            "resourceId": op.resource_id,
            "host": op.host,
            "targetHost": op.target_host,
            "migrationId": op.migration_id,
            "attempts": op.attempts,
            "createdAt": op.created_at,
        }
        if op.error_code:
            out["error"] = {"code": op.error_code, "message": op.error_message}
        return out

    @app.get("/subscriptions/{sub}/providers/Cvmotion.Fabric/operations/{op_id}")
    def operation(sub: str, op_id: str, principal: Caller) -> Any:
        def run(s: Session) -> dict[str, Any]:
            authorize(principal, Action.READ, sub)
            op = s.get(Operation, op_id)
            if op is None or op.subscription != sub:
                raise NotFound(f"operation {op_id} does not exist")
            return _operation_view(op)

        return ctl.transaction(run, write=False)

    @app.get(_VMS + "/{name}/operations")
    def vm_operations(sub: str, rg: str, name: str, principal: Caller) -> Any:
        def run(s: Session) -> dict[str, Any]:
            authorize(principal, Action.READ, sub)
            rows = s.scalars(
                select(Operation)
                .where(Operation.resource_id == vm_id(sub, rg, name).lower())
                .order_by(Operation.created_at.desc())
            )
            return {"value": [_operation_view(op) for op in rows]}

        return ctl.transaction(run, write=False)

    # -- deployments -------------------------------------------------------------------------------

    @app.put("/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Resources/deployments/{name}")
    def deploy(request: Request, sub: str, rg: str, name: str, principal: Caller, body: JsonBody) -> Any:
        parsed = _parse(DeploymentBody, body, "deployment")
        check_name("resourceGroups", rg)
        resources = expand_template(parsed.properties.template, parsed.properties.parameters, rg, "local")

        def run(s: Session) -> list[tuple[str, Operation | None]]:
            authorize(principal, Action.WRITE_VM, sub)
            # One transaction: a policy refusal or a full fleet for any VM creates none of them.
            return [(r.name, ctl.vms.put(s, sub, rg, r.name, r.body)[1]) for r in resources]

        made = ctl.transaction(run)
        ctl.wake_workers()
        url = base(request)
        ops = {
            vm: f"{url}/subscriptions/{sub}/providers/Cvmotion.Fabric/operations/{op.id}" if op else None
            for vm, op in made
        }
        return JSONResponse(
            {
                "id": f"{rg_id(sub, rg)}/providers/Microsoft.Resources/deployments/{name}",
                "name": name,
                "properties": {"provisioningState": "Accepted", "operations": ops},
            },
            status_code=202,
        )

    # -- policy ------------------------------------------------------------------------------------

    @app.put(f"/{_POLICY}/policyDefinitions/{{name}}")
    def put_definition(name: str, principal: Caller, body: JsonBody) -> Any:
        if not isinstance(body, dict):
            raise InvalidRequest("policy definition: expected a JSON object")

        def run(s: Session) -> dict[str, Any]:
            authorize(principal, Action.WRITE_POLICY)
            return ctl.policy.put_definition(s, name, body)

        return ctl.transaction(run)

    @app.get(f"/{_POLICY}/policyDefinitions")
    def list_definitions(principal: Caller) -> Any:
        def run(s: Session) -> dict[str, Any]:
            authorize(principal, Action.READ)
            return {"value": ctl.policy.list_definitions(s)}

        return ctl.transaction(run, write=False)

    def _put_assignment(scope: str, name: str, body: Any, principal: Principal) -> dict[str, Any]:
        parsed = _parse(AssignmentBody, body, "policy assignment")
        scope = parse_scope(scope)
        definition = parsed.properties.policy_definition_id.rsplit("/", 1)[-1]

        def run(s: Session) -> dict[str, Any]:
            authorize(principal, Action.WRITE_POLICY, scope.split("/")[2])
            return ctl.policy.put_assignment(s, scope, name, definition, parsed.properties.parameters)

        return ctl.transaction(run)

    def _delete_assignment(scope: str, name: str, principal: Principal) -> dict[str, Any]:
        def run(s: Session) -> dict[str, Any]:
            authorize(principal, Action.WRITE_POLICY, scope.split("/")[2])
            ctl.policy.delete_assignment(s, scope, name)
            return {"deleted": f"{scope}/{_POLICY}/policyAssignments/{name}"}

        return ctl.transaction(run)

    def _list_assignments(scope: str, principal: Principal) -> dict[str, Any]:
        def run(s: Session) -> dict[str, Any]:
            authorize(principal, Action.READ, scope.split("/")[2])
            return {"value": ctl.policy.list_assignments(s, scope)}

        return ctl.transaction(run, write=False)

    @app.put(f"/subscriptions/{{sub}}/{_POLICY}/policyAssignments/{{name}}")
    def put_sub_assignment(sub: str, name: str, principal: Caller, body: JsonBody) -> Any:
        return _put_assignment(f"/subscriptions/{sub}", name, body, principal)

    @app.put(f"/subscriptions/{{sub}}/resourceGroups/{{rg}}/{_POLICY}/policyAssignments/{{name}}")
    def put_rg_assignment(sub: str, rg: str, name: str, principal: Caller, body: JsonBody) -> Any:
        return _put_assignment(rg_id(sub, rg), name, body, principal)

    @app.delete(f"/subscriptions/{{sub}}/{_POLICY}/policyAssignments/{{name}}")
    def delete_sub_assignment(sub: str, name: str, principal: Caller) -> Any:
        return _delete_assignment(f"/subscriptions/{sub}", name, principal)

    @app.delete(f"/subscriptions/{{sub}}/resourceGroups/{{rg}}/{_POLICY}/policyAssignments/{{name}}")
    def delete_rg_assignment(sub: str, rg: str, name: str, principal: Caller) -> Any:
        return _delete_assignment(rg_id(sub, rg), name, principal)

    @app.get(f"/subscriptions/{{sub}}/{_POLICY}/policyAssignments")
    def list_sub_assignments(sub: str, principal: Caller) -> Any:
        return _list_assignments(f"/subscriptions/{sub}", principal)

    @app.get(f"/subscriptions/{{sub}}/resourceGroups/{{rg}}/{_POLICY}/policyAssignments")
    def list_rg_assignments(sub: str, rg: str, principal: Caller) -> Any:
        return _list_assignments(rg_id(sub, rg), principal)

    @app.get("/subscriptions/{sub}/providers/Microsoft.PolicyInsights/policyStates/latest/queryResults")
    def policy_states(sub: str, principal: Caller, limit: int = 100) -> Any:
        """Audit results (``audit`` effects): which resource was judged compliant by which assignment."""

        def run(s: Session) -> dict[str, Any]:
            authorize(principal, Action.READ, sub)
            rows = s.scalars(
                select(ComplianceResult)
                .where(ComplianceResult.resource_id.like(f"/subscriptions/{sub.lower()}/%"))
                .order_by(ComplianceResult.id.desc())
                .limit(max(1, min(limit, 1000)))
            )
            return {
                "value": [
                    {
                        "resourceId": r.resource_id,
                        "policyAssignmentId": r.assignment,
                        "complianceState": "Compliant" if r.compliant else "NonCompliant",
                        "effect": r.effect,
                        "timestamp": r.at,
                    }
                    for r in rows
                ]
            }

        return ctl.transaction(run, write=False)

    # -- hosts and events --------------------------------------------------------------------------

    @app.post(_HOSTS + "/register")
    def register(principal: Caller, body: JsonBody) -> Any:
        parsed = _parse(HostRegistration, body, "host registration")

        def run(s: Session) -> dict[str, Any]:
            authorize(principal, Action.REGISTER_HOST)
            return ctl.inventory.register(s, parsed)

        return ctl.transaction(run)

    @app.post(_HOSTS + "/{name}/heartbeat")
    def heartbeat(name: str, principal: Caller, body: JsonBody) -> Any:
        parsed = _parse(Heartbeat, body, "heartbeat")

        def run(s: Session) -> dict[str, Any]:
            authorize(principal, Action.REGISTER_HOST)
            return ctl.inventory.heartbeat(s, name, parsed)

        return ctl.transaction(run)

    @app.get(_HOSTS)
    def hosts(principal: Caller) -> Any:
        def run(s: Session) -> dict[str, Any]:
            authorize(principal, Action.READ)
            return {"value": ctl.inventory.list_hosts(s)}

        return ctl.transaction(run, write=False)

    @app.get("/providers/Cvmotion.Fabric/events")
    def events(principal: Caller, limit: int = 100, follow: bool = False) -> Any:
        """The latest events (CloudEvents JSON); ``follow``: then every new one, as Server-Sent Events."""
        authorize(principal, Action.READ)

        def visible(e: Event) -> bool:
            sub = e.subject.split("/")[2] if e.subject.startswith("/subscriptions/") else None
            return sub is None or principal.subscription in ("*", sub)

        def since(after: int | None, count: int) -> list[tuple[int, dict[str, Any]]]:
            def run(s: Session) -> list[tuple[int, dict[str, Any]]]:
                if after is None:  # the latest ``count``, oldest first
                    rows = list(s.scalars(select(Event).order_by(Event.id.desc()).limit(count)))[::-1]
                else:
                    rows = list(s.scalars(select(Event).where(Event.id > after).order_by(Event.id).limit(count)))
                if not rows:
                    return []
                return [(e.id, _cloud_event(e)) for e in rows if visible(e)] + [(rows[-1].id, {})]

            return ctl.transaction(run, write=False)

        first = since(None, max(1, min(limit, 1000)))
        if not follow:
            return {"value": [event for _, event in first if event]}

        def stream() -> Iterator[str]:
            last = first[-1][0] if first else 0
            for _, event in first:
                if event:
                    yield f"data: {json.dumps(event)}\n\n"
            deadline = time.monotonic() + _STREAM_LIMIT_S
            while time.monotonic() < deadline:
                batch = since(last, 500)
                for _, event in batch:
                    if event:
                        yield f"data: {json.dumps(event)}\n\n"
                if batch:
                    last = batch[-1][0]  # the marker entry carries the newest id seen, visible or not
                else:
                    yield ": keep-alive\n\n"
                    time.sleep(_STREAM_POLL_S)

        return StreamingResponse(stream(), media_type="text/event-stream")

    _ = Vm  # the VM table is reached through the services
    return app


def _cloud_event(e: Event) -> dict[str, Any]:
    from datetime import UTC, datetime

    return {
        "specversion": "1.0",
        "id": str(e.id),
        "source": "/cvmotion/controller",
        "type": f"Cvmotion.Fabric.{e.type}",
        "subject": e.subject,
        "time": datetime.fromtimestamp(e.time, UTC).isoformat(),
        "data": e.data,
    }
