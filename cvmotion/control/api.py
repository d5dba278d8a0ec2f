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
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ValidationError
from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from cvmotion.control import api_schema as doc
from cvmotion.control.api_maintenance import install_maintenance
from cvmotion.control.api_schema import (
    ArmErrorEnvelope,
    AssignmentBody,
    DeploymentBody,
    DeploymentName,
    HostName,
    Limit,
    MigrateBody,
    OperationId,
    PolicyName,
    Rg,
    Sub,
    VmName,
    refusals,
    render_arm_error,
)
from cvmotion.control.auth import Action, Principal, authenticate, authorize
from cvmotion.control.db import ComplianceResult, Operation, Vm
from cvmotion.control.errors import Forbidden, InvalidRequest, RequestDisallowedByPolicy, Unauthorized
from cvmotion.control.events_api import install_fleet_events
from cvmotion.control.inventory import Heartbeat, HostRegistration
from cvmotion.control.operations import status_of
from cvmotion.control.policy_schema import definition_body
from cvmotion.control.policy_store import parse_scope
from cvmotion.control.portal import install_portal
from cvmotion.control.resources import VmPatch, VmPut, check_name, rg_id, vm_id
from cvmotion.control.service import FleetController
from cvmotion.control.templates import expand_template
from cvmotion.errors import Conflict, CvmError, NotFound, UsageError
from cvmotion.ipc.body_limit import ContentLengthGate
from cvmotion.ipc.openapi import install_error_handlers
from cvmotion.ipc.validation import describe_problems

__all__ = ["create_app"]

log = logging.getLogger("cvmotion.control.api")

MAX_BODY = 1 << 20
_VMS = "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines"
_POLICY = "providers/Microsoft.Authorization"
_HOSTS = "/providers/Cvmotion.Fabric/hosts"


class BodyRefused(InvalidRequest):
    """A body this API does not read: too large (413) or not ``application/json`` (415)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


NO_BODY = object()  # ``_optional_json_body`` when the request has none: JSON ``null`` is a body, and wrong


async def _json_body(request: Request) -> Any:
    """The JSON body (``None`` when there is none), at most ``MAX_BODY`` bytes, counted as it arrives."""
    body = await _optional_json_body(request)
    return None if body is NO_BODY else body


async def _optional_json_body(request: Request) -> Any:
    """The JSON body, or ``NO_BODY`` when there is none (an operation whose body is optional)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise BodyRefused(413, f"request body over {MAX_BODY} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        return NO_BODY
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype != "application/json":
        raise BodyRefused(415, f"Content-Type must be application/json, not {ctype!r}")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {str(exc)[:200]}") from None


JsonBody = Annotated[Any, Depends(_json_body)]
_bearer = HTTPBearer(auto_error=False, scheme_name="BearerToken", description="cvmotion controller token create")


def _caller(request: Request, _: Annotated[Any, Depends(_bearer)] = None) -> Principal:
    """The request's principal; tokens are never revoked in place, so a per-app cache is safe."""
    authorization = request.headers.get("authorization")
    tokens: dict[str, Principal] = request.app.state.tokens
    if authorization is not None and authorization in tokens:
        return tokens[authorization]
    ctl: FleetController = request.app.state.controller
    principal = ctl.transaction(lambda s: authenticate(s, authorization), write=False)
    tokens[str(authorization)] = principal
    return principal


Caller = Annotated[Principal, Depends(_caller)]


def _envelope(
    status: int, code: str, kind: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    body = {"error": {"code": code, "kind": kind, "message": message, **extra}}
    return JSONResponse(body, status_code=status, headers=headers)


def _error_response(exc: CvmError) -> JSONResponse:
    kind = type(exc).__name__
    if isinstance(exc, BodyRefused):
        return _envelope(exc.status, doc.CODES[exc.status], "InvalidRequest", str(exc))
    if isinstance(exc, RequestDisallowedByPolicy):
        return _envelope(
            403, "RequestDisallowedByPolicy", kind, str(exc), policyAssignment=exc.assignment, policy=exc.definition
        )
    if isinstance(exc, Unauthorized):
        return _envelope(401, "AuthenticationFailed", kind, str(exc), {"WWW-Authenticate": "Bearer"})
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
        problems = describe_problems(exc.errors(), root="body")
        raise InvalidRequest(f"{what}: {problems}") from None


def create_app(ctl: FleetController) -> FastAPI:  # noqa: C901 - one closure per route is the point
    app = FastAPI(
        title="cvmotion fleet controller",
        description="VMs, live migrations, policy and hosts of a fleet, in Azure Resource Manager's shapes.",
        version="1",
        docs_url=None,
        redoc_url=None,
    )
    app.state.controller = ctl
    app.state.tokens = {}
    install_error_handlers(app, model=ArmErrorEnvelope, render=render_arm_error)
    doc.add_policy_schemas(app)

    @app.exception_handler(CvmError)
    async def _cvm(_: Request, exc: CvmError) -> JSONResponse:
        return _error_response(exc)

    async def _db(_: Request, exc: Exception) -> JSONResponse:
        # One transaction per request: it rolled back, or (cut at its commit) landed whole; never half of it.
        log.warning("database unavailable: %s", str(exc).splitlines()[0][:300])
        return _envelope(
            503, "DatabaseUnavailable", "DatabaseUnavailable", "the database is unavailable; retry",
            headers={"Retry-After": "1"},
        )  # fmt: skip

    # A connection the server cut (InterfaceError: "the connection is closed") is the same outage.
    app.add_exception_handler(OperationalError, _db)
    app.add_exception_handler(InterfaceError, _db)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        # Never a traceback to the client; the log has it.
        log.exception("request failed", exc_info=exc)
        return _envelope(
            500, "InternalServerError", type(exc).__name__, "internal error; the controller log has details"
        )

    def _limit_body(length: str | None) -> JSONResponse | None:
        if length is not None and not length.isdigit():
            return _envelope(400, "InvalidRequestContent", "InvalidRequest", f"Content-Length {length[:40]!r}")
        if length is not None and int(length) > MAX_BODY:
            return _envelope(413, doc.CODES[413], "InvalidRequest", f"request body over {MAX_BODY} bytes")
        return None

    app.add_middleware(ContentLengthGate, judge=_limit_body)

    def base(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    @app.get(
        "/healthz",
        operation_id="healthz",
        summary="liveness: this replica, whether it leads, its database",
        responses={200: {"model": doc.ControllerHealth, "description": "serving"}, **refusals(auth=False)},
    )
    def healthz() -> dict[str, Any]:
        return {"replica": ctl.replica, "leader": ctl.leader, "database": ctl.dialect}

    # -- virtual machines --------------------------------------------------------------------------

    @app.put(
        _VMS + "/{name}",
        operation_id="put_vm",
        summary="create a confidential VM (202, long-running) or update an existing one (200)",
        response_model=None,
        responses={
            200: {"model": doc.VmResource, "description": "updated", "links": doc.vm_links()},
            202: {
                "model": doc.VmResource,
                "description": "accepted: placed on a host; poll Azure-AsyncOperation",
                "headers": doc.ASYNC_HEADERS,
                "links": doc.vm_links(),
            },
            **refusals(404, 409, body=True),
        },
        openapi_extra=doc.json_request(VmPut, doc.VM_EXAMPLE),
    )
    def put_vm(request: Request, sub: Sub, rg: Rg, name: VmName, principal: Caller, body: JsonBody) -> JSONResponse:
        parsed = _parse(VmPut, body, "virtual machine")

        def run(s: Session) -> tuple[dict[str, Any], Operation | None]:
            authorize(principal, Action.WRITE_VM, sub)
            return ctl.vms.put_view(s, sub, rg, name, parsed)

        resource, op = ctl.transaction(run)
        ctl.wake_workers()
        return _async(base(request), resource, op)

    @app.patch(
        _VMS + "/{name}",
        operation_id="patch_vm",
        summary="change a VM's tags or confidentialLiveMigration",
        responses={200: {"model": doc.VmResource, "description": "updated"}, **refusals(404, 409, body=True)},
        openapi_extra=doc.json_request(VmPatch, doc.PATCH_EXAMPLE),
    )
    def patch_vm(sub: Sub, rg: Rg, name: VmName, principal: Caller, body: JsonBody) -> Any:
        parsed = _parse(VmPatch, body, "virtual machine patch")

        def run(s: Session) -> dict[str, Any]:
            authorize(principal, Action.WRITE_VM, sub)
            return ctl.vms.resource(s, ctl.vms.patch(s, sub, rg, name, parsed))

        return ctl.transaction(run)

    @app.get(
        _VMS + "/{name}",
        operation_id="get_vm",
        summary="a VM, with its instance view and live-migration eligibility",
        responses={200: {"model": doc.VmResource, "description": "the VM"}, **refusals(404)},
    )
    def get_vm(sub: Sub, rg: Rg, name: VmName, principal: Caller) -> Any:
        def run(s: Session) -> dict[str, Any]:
            authorize(principal, Action.READ, sub)
            return ctl.vms.resource(s, ctl.vms.get(s, sub, rg, name))

        return ctl.transaction(run, write=False)

    @app.get(
        _VMS,
        operation_id="list_vms",
        summary="the VMs of a resource group",
        responses={200: {"model": doc.VmList, "description": "the VMs"}, **refusals()},
    )
    def list_vms(sub: Sub, rg: Rg, principal: Caller) -> Any:
        def run(s: Session) -> dict[str, Any]:
            authorize(principal, Action.READ, sub)
            return {"value": [ctl.vms.resource(s, vm) for vm in ctl.vms.list_vms(s, sub, rg)]}

        return ctl.transaction(run, write=False)

    @app.get(
        "/subscriptions/{sub}/providers/Microsoft.Compute/virtualMachines",
        operation_id="list_subscription_vms",
        summary="the VMs of a subscription",
        responses={200: {"model": doc.VmList, "description": "the VMs"}, **refusals()},
    )
    def list_sub_vms(sub: Sub, principal: Caller) -> Any:
        def run(s: Session) -> dict[str, Any]:
            authorize(principal, Action.READ, sub)
            return {"value": [ctl.vms.resource(s, vm) for vm in ctl.vms.list_vms(s, sub, None)]}

        return ctl.transaction(run, write=False)

    @app.delete(
        _VMS + "/{name}",
        operation_id="delete_vm",
        summary="delete a VM (202, long-running; 200 when no host holds it)",
        response_model=None,
        responses={
            200: {"model": doc.Deleting, "description": "deleted at once"},
            202: {"model": doc.Deleting, "description": "accepted", "headers": doc.ASYNC_HEADERS},
            **refusals(404, 409),
        },
    )
    def delete_vm(request: Request, sub: Sub, rg: Rg, name: VmName, principal: Caller) -> Any:
        def run(s: Session) -> Operation | None:
            authorize(principal, Action.WRITE_VM, sub)
            return ctl.vms.delete(s, sub, rg, name)

        op = ctl.transaction(run)
        ctl.wake_workers()
        return _async(base(request), {"deleting": name}, op)

    @app.post(
        _VMS + "/{name}/migrate",
        operation_id="migrate_vm",
        summary="live-migrate a VM (an operator action, role Owner); the body is optional",
        response_model=None,
        responses={
            202: {"model": doc.MigrationAccepted, "description": "accepted", "headers": doc.ASYNC_HEADERS},
            **refusals(404, 409, body=True),
        },
        openapi_extra=doc.json_request(MigrateBody, {"targetHost": "host-b"}, required=False),
    )
    def migrate_vm(request: Request, sub: Sub, rg: Rg, name: VmName, principal: Caller, body: JsonBody) -> Any:
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

    @app.get(
        "/subscriptions/{sub}/providers/Cvmotion.Fabric/operations/{op_id}",
        operation_id="get_operation",
        summary="a long-running operation (the Azure-AsyncOperation of a 202)",
        responses={200: {"model": doc.OperationStatus, "description": "its status"}, **refusals(404)},
    )
    def operation(sub: Sub, op_id: OperationId, principal: Caller) -> Any:
        def run(s: Session) -> dict[str, Any]:
            authorize(principal, Action.READ, sub)
            op = s.get(Operation, op_id)
            if op is None or op.subscription != sub:
                raise NotFound(f"operation {op_id} does not exist")
            return _operation_view(op)

        return ctl.transaction(run, write=False)

    @app.get(
        _VMS + "/{name}/operations",
        operation_id="list_vm_operations",
        summary="a VM's operations, newest first",
        responses={200: {"model": doc.OperationList, "description": "its operations"}, **refusals()},
    )
    def vm_operations(sub: Sub, rg: Rg, name: VmName, principal: Caller) -> Any:
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

    @app.put(
        "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Resources/deployments/{name}",
        operation_id="put_deployment",
        summary="deploy an ARM template's VMs: all judged and placed in one transaction",
        response_model=None,
        responses={
            202: {"model": doc.DeploymentAccepted, "description": "accepted: each VM's operation URL"},
            **refusals(404, 409, body=True),
        },
        openapi_extra=doc.json_request(DeploymentBody, doc.DEPLOYMENT_EXAMPLE),
    )
    def deploy(request: Request, sub: Sub, rg: Rg, name: DeploymentName, principal: Caller, body: JsonBody) -> Any:
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

    @app.put(
        f"/{_POLICY}/policyDefinitions/{{name}}",
        operation_id="put_policy_definition",
        summary="create or replace a custom policy definition (Azure Policy's grammar)",
        responses={200: {"model": doc.ArmResource, "description": "stored"}, **refusals(409, body=True)},
        openapi_extra=definition_body(),
    )
    def put_definition(name: PolicyName, principal: Caller, body: JsonBody) -> Any:
        if not isinstance(body, dict):
            raise InvalidRequest("policy definition: expected a JSON object")

        def run(s: Session) -> dict[str, Any]:
            authorize(principal, Action.WRITE_POLICY)
            return ctl.policy.put_definition(s, name, body)

        return ctl.transaction(run)

    @app.get(
        f"/{_POLICY}/policyDefinitions",
        operation_id="list_policy_definitions",
        summary="the policy definitions, built in and custom",
        responses={200: {"model": doc.ArmList, "description": "the definitions"}, **refusals()},
    )
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

    @app.put(
        f"/subscriptions/{{sub}}/{_POLICY}/policyAssignments/{{name}}",
        operation_id="put_subscription_policy_assignment",
        summary="assign a policy at a subscription",
        **doc.ASSIGN,
    )
    def put_sub_assignment(sub: Sub, name: PolicyName, principal: Caller, body: JsonBody) -> Any:
        return _put_assignment(f"/subscriptions/{sub}", name, body, principal)

    @app.put(
        f"/subscriptions/{{sub}}/resourceGroups/{{rg}}/{_POLICY}/policyAssignments/{{name}}",
        operation_id="put_group_policy_assignment",
        summary="assign a policy at a resource group",
        **doc.ASSIGN,
    )
    def put_rg_assignment(sub: Sub, rg: Rg, name: PolicyName, principal: Caller, body: JsonBody) -> Any:
        return _put_assignment(rg_id(sub, rg), name, body, principal)

    @app.delete(
        f"/subscriptions/{{sub}}/{_POLICY}/policyAssignments/{{name}}",
        operation_id="delete_subscription_policy_assignment",
        summary="remove a subscription's policy assignment",
        **doc.UNASSIGN,
    )
    def delete_sub_assignment(sub: Sub, name: PolicyName, principal: Caller) -> Any:
        return _delete_assignment(f"/subscriptions/{sub}", name, principal)

    @app.delete(
        f"/subscriptions/{{sub}}/resourceGroups/{{rg}}/{_POLICY}/policyAssignments/{{name}}",
        operation_id="delete_group_policy_assignment",
        summary="remove a resource group's policy assignment",
        **doc.UNASSIGN,
    )
    def delete_rg_assignment(sub: Sub, rg: Rg, name: PolicyName, principal: Caller) -> Any:
        return _delete_assignment(rg_id(sub, rg), name, principal)

    @app.get(
        f"/subscriptions/{{sub}}/{_POLICY}/policyAssignments",
        operation_id="list_subscription_policy_assignments",
        summary="the policy assignments within a subscription",
        responses={200: {"model": doc.ArmList, "description": "the assignments"}, **refusals()},
    )
    def list_sub_assignments(sub: Sub, principal: Caller) -> Any:
        return _list_assignments(f"/subscriptions/{sub}", principal)

    @app.get(
        f"/subscriptions/{{sub}}/resourceGroups/{{rg}}/{_POLICY}/policyAssignments",
        operation_id="list_group_policy_assignments",
        summary="the policy assignments within a resource group",
        responses={200: {"model": doc.ArmList, "description": "the assignments"}, **refusals()},
    )
    def list_rg_assignments(sub: Sub, rg: Rg, principal: Caller) -> Any:
        return _list_assignments(rg_id(sub, rg), principal)

    @app.get(
        "/subscriptions/{sub}/providers/Microsoft.PolicyInsights/policyStates/latest/queryResults",
        operation_id="policy_states",
        summary="audit results: each resource's compliance per audit assignment, newest first",
        responses={200: {"model": doc.ComplianceList, "description": "the results"}, **refusals()},
    )
    def policy_states(sub: Sub, principal: Caller, limit: Limit = 100) -> Any:
        """Audit results (``audit`` effects): which resource was judged compliant by which assignment."""

        def run(s: Session) -> dict[str, Any]:
            authorize(principal, Action.READ, sub)
            rows = s.scalars(
                select(ComplianceResult)
                .where(ComplianceResult.resource_id.like(f"/subscriptions/{sub.lower()}/%"))
                .order_by(ComplianceResult.id.desc())
                .limit(limit)
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

    @app.post(
        _HOSTS + "/register",
        operation_id="register_host",
        summary="a host daemon registers (role Host): its identity, capacity and the VMs it runs",
        responses={200: {"model": doc.ArmResource, "description": "registered"}, **refusals(409, body=True)},
        openapi_extra=doc.json_request(HostRegistration, doc.HOST_EXAMPLE),
    )
    def register(principal: Caller, body: JsonBody) -> Any:
        parsed = _parse(HostRegistration, body, "host registration")

        def run(s: Session) -> dict[str, Any]:
            authorize(principal, Action.REGISTER_HOST)
            return ctl.inventory.register(s, parsed)

        return ctl.transaction(run)

    @app.post(
        _HOSTS + "/{name}/heartbeat",
        operation_id="host_heartbeat",
        summary="a registered host is alive and runs these VMs (role Host)",
        responses={200: {"model": doc.HeartbeatAnswer, "description": "noted"}, **refusals(404, body=True)},
        openapi_extra=doc.json_request(Heartbeat, {"vms": ["web-0123456789"]}),
    )
    def heartbeat(name: HostName, principal: Caller, body: JsonBody) -> Any:
        parsed = _parse(Heartbeat, body, "heartbeat")

        def run(s: Session) -> dict[str, Any]:
            authorize(principal, Action.REGISTER_HOST)
            return ctl.inventory.heartbeat(s, name, parsed)

        return ctl.transaction(run)

    @app.get(
        _HOSTS,
        operation_id="list_hosts",
        summary="the registered hosts",
        responses={200: {"model": doc.ArmList, "description": "the hosts"}, **refusals()},
    )
    def hosts(principal: Caller) -> Any:
        def run(s: Session) -> dict[str, Any]:
            authorize(principal, Action.READ)
            return {"value": ctl.inventory.list_hosts(s)}

        return ctl.transaction(run, write=False)

    install_fleet_events(app, ctl)  # events (CloudEvents, SSE), webhooks, /metrics
    install_maintenance(app, ctl)  # drains, cordons, maintenance windows, a VM's Scheduled Events
    _ = Vm  # the VM table is reached through the services
    install_portal(app, ctl)  # the web portal at / (HTML, outside the OpenAPI document), over this same API
    return app
