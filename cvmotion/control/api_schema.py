"""control layer: the controller API's OpenAPI contract — its error envelope, path rules, bodies and answers.

Every refusal is ``{"error": {"code", "kind", "message"[, "policyAssignment", "policy"]}}`` (``ArmErrorEnvelope``):
``code`` is ARM's (``InvalidRequestContent``, ``AuthenticationFailed``, ``AuthorizationFailed``,
``RequestDisallowedByPolicy``, ``ResourceNotFound``, ``Conflict``, ...), ``kind`` the error's class.  What
a schema cannot state (a policy rule's parameters, a template's expressions, a host that exists) is each
operation's documented 400/404/409.  Tokens are HTTP bearer tokens (``BearerToken``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import FastAPI, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from cvmotion.control.policy_schema import policy_components
from cvmotion.control.resources import RG_NAME_PATTERN, SUB_NAME_PATTERN, VM_NAME_PATTERN
from cvmotion.ipc.names import NAME_PATTERN
from cvmotion.ipc.openapi import error_responses, inline_schema

__all__ = [
    "ARM_NAME_PATTERN",
    "CODES",
    "ArmErrorEnvelope",
    "AssignmentBody",
    "DeploymentBody",
    "MigrateBody",
    "add_policy_schemas",
    "json_request",
    "refusals",
    "render_arm_error",
    "vm_links",
]

ARM_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # deployments, policy definitions and assignments
# ARM's error code per status; 403 is AuthorizationFailed unless a policy denied (RequestDisallowedByPolicy).
CODES = {
    400: "InvalidRequestContent",
    401: "AuthenticationFailed",
    403: "AuthorizationFailed",
    404: "ResourceNotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    413: "RequestEntityTooLarge",
    415: "UnsupportedMediaType",
    500: "InternalServerError",
    503: "DatabaseUnavailable",
}
# The router's refusals (cvmotion.ipc.openapi) in the controller's kinds: its errors' class names.
_ROUTER_KINDS = {"not_found": "NotFound", "method_not_allowed": "MethodNotAllowed", "invalid_request": "InvalidRequest"}


class ArmErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str = Field(description="ARM's error code (stable, machine-readable)", examples=["ResourceNotFound"])
    kind: str = Field(description="the controller's error class", examples=["NotFound"])
    message: str = Field(description="for people: what was refused and why")
    policyAssignment: str | None = Field(  # noqa: N815 - ARM's spelling
        None, description="the deny assignment that matched (RequestDisallowedByPolicy only)"
    )
    policy: str | None = Field(None, description="its policy definition (RequestDisallowedByPolicy only)")


class ArmErrorEnvelope(BaseModel):
    """The body of every refusal of the fleet controller (Azure Resource Manager's shape)."""

    model_config = ConfigDict(extra="forbid")

    error: ArmErrorDetail


def render_arm_error(status: int, kind: str, message: str) -> dict[str, Any]:
    code = CODES.get(status, "HttpError")
    return {"error": {"code": code, "kind": _ROUTER_KINDS.get(kind, kind), "message": message}}


_TABLE: dict[int, tuple[str, ...]] = {
    400: ("a path, query or body breaks its schema, or a rule the schema cannot state", "InvalidRequest"),
    401: ("no bearer token, or one this controller never issued", "Unauthorized"),
    403: (
        "the token's role or subscription does not allow it (AuthorizationFailed), or a deny policy assignment"
        " matched (RequestDisallowedByPolicy, naming it)",
        "Forbidden",
        "RequestDisallowedByPolicy",
    ),
    404: ("no such resource", "NotFound"),
    409: ("the resource's state or the fleet's capacity does not allow it now", "Conflict"),
    413: ("the body is larger than 1 MiB", "InvalidRequest"),
    415: ("the body is not application/json", "InvalidRequest"),
    500: ("an internal error (the controller log has details; never a traceback)", "InternalServerError"),
    503: ("the database is unavailable: retry", "DatabaseUnavailable"),
}
_ALWAYS = (400, 500, 503)
_AUTH = (401, 403)
_BODY = (413, 415)


def refusals(*statuses: int, auth: bool = True, body: bool = False) -> dict[int | str, dict[str, Any]]:
    """``responses=`` of the refusals an operation can answer: always 400/500/503, plus the named ones."""
    chosen = {*_ALWAYS, *statuses, *(_AUTH if auth else ()), *(_BODY if body else ())}
    return error_responses({s: _TABLE[s] for s in chosen}, model=ArmErrorEnvelope, render=render_arm_error)


# -- request bodies the handlers read themselves (``api._parse``) ------------------------------------------


class MigrateBody(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    target_host: str | None = Field(
        default=None, alias="targetHost", pattern=NAME_PATTERN, description="a registered host (else: chosen)"
    )


class AssignmentBody(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    class Properties(BaseModel):
        model_config = ConfigDict(extra="forbid", populate_by_name=True)
        policy_definition_id: str = Field(
            alias="policyDefinitionId",
            pattern=rf"^(/providers/Microsoft\.Authorization/policyDefinitions/)?{ARM_NAME_PATTERN[1:]}",
            examples=["/providers/Microsoft.Authorization/policyDefinitions/allowed-host-pools"],
        )
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


# -- path and query parameters --------------------------------------------------------------------------

Sub = Annotated[str, Path(pattern=SUB_NAME_PATTERN, description="subscription", examples=["default"])]
Rg = Annotated[str, Path(pattern=RG_NAME_PATTERN, description="resource group", examples=["rg1"])]
VmName = Annotated[str, Path(pattern=VM_NAME_PATTERN, description="the VM's name", examples=["web-1"])]
HostName = Annotated[str, Path(pattern=NAME_PATTERN, description="a host's name", examples=["host-a"])]
PolicyName = Annotated[str, Path(pattern=ARM_NAME_PATTERN, examples=["deny-confidential-live-migration"])]
DeploymentName = Annotated[str, Path(pattern=ARM_NAME_PATTERN, examples=["deploy-1"])]
OperationId = Annotated[str, Path(pattern=r"^[0-9a-f-]{1,64}$", examples=["0b8e7a5c-3f1d-4a59-9a4e-6f1b2c3d4e5f"])]
Limit = Annotated[int, Query(ge=1, le=1000, description="at most this many, newest first")]


# -- answers --------------------------------------------------------------------------------------------


class ControllerHealth(BaseModel):
    replica: str
    leader: bool
    database: str


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class VmResource(_Open):
    id: str = Field(
        examples=["/subscriptions/default/resourceGroups/rg1/providers/Microsoft.Compute/virtualMachines/web"]
    )
    name: str
    type: Literal["Microsoft.Compute/virtualMachines"]
    location: str
    tags: dict[str, str]
    properties: dict[str, Any] = Field(
        description="hardwareProfile, securityProfile, storageProfile, osProfile, provisioningState, instanceView"
    )


class VmList(BaseModel):
    value: list[VmResource]


class Deleting(BaseModel):
    deleting: str = Field(description="the VM being deleted")


class MigrationAccepted(BaseModel):
    operation: str
    targetHost: str | None  # noqa: N815 - ARM's spelling


class OperationError(BaseModel):
    code: str
    message: str | None


class OperationStatus(_Open):
    id: str
    name: str = Field(description="Create, Delete or Migrate")
    status: Literal["InProgress", "Succeeded", "Failed"]
    step: str
    resourceId: str  # noqa: N815
    error: OperationError | None = None


class OperationList(BaseModel):
    value: list[OperationStatus]


class DeploymentAccepted(_Open):
    id: str
    name: str
    properties: dict[str, Any] = Field(description="provisioningState and each VM's operation URL")


class ArmResource(_Open):
    id: str
    name: str
    type: str
    properties: dict[str, Any]


class ArmList(BaseModel):
    value: list[ArmResource]


class Deleted(BaseModel):
    deleted: str


class ComplianceState(_Open):
    resourceId: str  # noqa: N815
    policyAssignmentId: str  # noqa: N815
    complianceState: Literal["Compliant", "NonCompliant"]  # noqa: N815


class ComplianceList(BaseModel):
    value: list[ComplianceState]


class HeartbeatAnswer(BaseModel):
    name: str
    state: Literal["Available", "Unavailable"]


class CloudEvent(_Open):
    specversion: Literal["1.0"]
    id: str
    source: str
    type: str
    subject: str
    time: str
    data: Any


class ServerSentEvent(_Open):
    """One event of ``follow=true``'s text/event-stream: its ``data`` is a CloudEvent's JSON."""

    data: str = Field(description="a CloudEvent, as JSON")
    event: str | None = None
    id: str | None = None


class EventList(BaseModel):
    value: list[CloudEvent]


ASYNC_HEADERS = {
    "Azure-AsyncOperation": {
        "description": "the operation to poll (GET): InProgress, then Succeeded or Failed",
        "schema": {"type": "string", "format": "uri"},
    },
    "Location": {"description": "the same operation URL", "schema": {"type": "string", "format": "uri"}},
    "Retry-After": {"description": "seconds to wait before polling", "schema": {"type": "string"}},
}


def vm_links(*skip: str) -> dict[str, Any]:
    """OpenAPI links from an operation on one VM to the others on it (the same path parameters)."""
    same = {"sub": "$request.path.sub", "rg": "$request.path.rg", "name": "$request.path.name"}
    links = {
        "get": ("get_vm", "show the VM"),
        "patch": ("patch_vm", "update it"),
        "delete": ("delete_vm", "delete it"),
        "operations": ("list_vm_operations", "its operations"),
        "migrate": ("migrate_vm", "live-migrate it"),
    }
    return {
        key: {"operationId": op, "parameters": same, "description": text}
        for key, (op, text) in links.items()
        if key not in skip
    }


# -- the document: bodies, examples, the policy grammar, exact bounds -------------------------------------


def json_request(model: type[BaseModel], example: Any, *, required: bool = True) -> dict[str, Any]:
    """``openapi_extra``: the JSON body the handler reads itself (``_parse``), by its model's schema."""
    content = {"application/json": {"schema": inline_schema(model), "example": example}}
    return {"requestBody": {"required": required, "content": content}}


VM_EXAMPLE = {
    "location": "local",
    "properties": {
        "hardwareProfile": {"vmSize": "Standard_DC2as_v5"},
        "securityProfile": {"securityType": "ConfidentialVM", "confidentialLiveMigration": "Enabled"},
        "storageProfile": {"imageReference": {"id": "kvstore"}},
    },
}
TEMPLATE_EXAMPLE = {
    "parameters": {"vmName": {"type": "string", "defaultValue": "db"}},
    "resources": [{"type": "Microsoft.Compute/virtualMachines", "name": "[parameters('vmName')]", **VM_EXAMPLE}],
}
PATCH_EXAMPLE = {"properties": {"securityProfile": {"confidentialLiveMigration": "Enabled"}}}
DEPLOYMENT_EXAMPLE = {"properties": {"template": TEMPLATE_EXAMPLE, "parameters": {}}}
HOST_EXAMPLE = {
    "name": "host-a", "chip_id": "ab" * 32, "product": "Genoa", "tcb": 0, "pool": "pool-a", "vcpus": 96,
    "memory_gib": 768, "api_url": "http://127.0.0.1:8081", "migration_address": "127.0.0.1:8082", "vms": [],
}  # fmt: skip
ASSIGN: dict[str, Any] = {
    "responses": {200: {"model": ArmResource, "description": "assigned"}, **refusals(404, body=True)},
    "openapi_extra": json_request(
        AssignmentBody,
        {
            "properties": {
                "policyDefinitionId": "/providers/Microsoft.Authorization/policyDefinitions/allowed-host-pools",
                "parameters": {"allowedHostPools": {"value": ["pool-a"]}},
            }
        },
    ),
}
UNASSIGN: dict[str, Any] = {
    "responses": {200: {"model": Deleted, "description": "removed"}, **refusals(404)},
}


_U64_MAX = (1 << 64) - 1


def _exact_bounds(node: Any) -> Any:
    """FastAPI's OpenAPI models keep numeric bounds as floats; a TCB's 2**64 - 1 is none: write it exactly."""
    if isinstance(node, dict):
        return {
            key: (_U64_MAX if value == float(_U64_MAX) else int(value))
            if key in ("minimum", "maximum") and isinstance(value, float) and value.is_integer()
            else _exact_bounds(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_exact_bounds(value) for value in node]
    return node


def add_policy_schemas(app: FastAPI) -> None:
    """The recursive policy grammar (``policy_schema``) joins the document's components; bounds made exact."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = _exact_bounds(generate())
            document["components"].setdefault("schemas", {}).update(policy_components())
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
