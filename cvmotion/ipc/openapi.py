"""ipc: what every HTTP service's OpenAPI document shares — the error envelope and the refusals of the router.

* ``ErrorEnvelope``: the one schema of ``{"error": {"kind", "message"[, "violations"]}}``, so a generated
  client gets one error type for every service;
* ``error_responses``: the ``responses=`` of an operation — each status it can refuse with, the envelope as
  its schema, the kinds it may carry in the description and one of them as the example;
* ``install_error_handlers``: the router's own refusals in the envelope — 404 for an unknown path, 405
  with an ``Allow`` header naming *every* method served on that path (RFC 9110 section 15.5.6; Starlette
  names only the methods of the first route that matched the path), 400 for a parameter FastAPI refused —
  and the document says 400 where FastAPI would have written its default 422 ``HTTPValidationError``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any, Literal

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from cvmotion.ipc.envelope import error_body
from cvmotion.ipc.validation import describe_problems

__all__ = [
    "ErrorDetail",
    "ErrorEnvelope",
    "Health",
    "allowed_methods",
    "error_responses",
    "inline_schema",
    "install_error_handlers",
    "json_body",
    "render_error",
]

log = logging.getLogger("cvmotion.http")


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = Field(description="stable, machine-readable reason (snake_case)", examples=["not_found"])
    message: str = Field(description="for people: what was refused and why")
    violations: list[str] | None = Field(
        None, description="every rule the request broke (policy refusals only)", examples=[["debug allowed"]]
    )


class ErrorEnvelope(BaseModel):
    """The body of every refusal of every cvmotion HTTP service."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail


class Health(BaseModel):
    """``GET /healthz``: the process is serving."""

    status: Literal["ok"]


# (status, kind, message) -> the JSON body of a refusal; a service with a richer envelope passes its own.
Render = Callable[[int, str, str], dict[str, Any]]


def render_error(status: int, kind: str, message: str) -> dict[str, Any]:
    """The body of a refusal in ``ErrorEnvelope``."""
    return error_body(kind, message)


def error_responses(
    table: Mapping[int, tuple[str, ...]], *, model: type[BaseModel] = ErrorEnvelope, render: Render = render_error
) -> dict[int | str, dict[str, Any]]:
    """``{status: (description, kind, ...)}`` -> FastAPI ``responses=``: the envelope, the kinds, an example.

    ``model`` and ``render``: a service whose envelope carries more (the controller's ARM ``code``).
    """
    out: dict[int | str, dict[str, Any]] = {}
    for status, (description, *kinds) in sorted(table.items()):
        example = render(status, kinds[0], description)
        out[status] = {
            "model": model,
            "description": f"{description} (kind: {', '.join(kinds)})",
            "content": {"application/json": {"example": example}},
        }
    return out


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON Schema (validation side) with its ``$defs`` inlined, for an operation's ``openapi_extra``."""
    doc = model.model_json_schema(ref_template="#/$defs/{model}")
    defs = doc.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    resolved: dict[str, Any] = resolve(doc)
    return resolved


def json_body(model: type[BaseModel], example: Any) -> dict[str, Any]:
    """``openapi_extra`` of an operation that reads a required JSON body shaped like ``model`` by itself."""
    content = {"application/json": {"schema": inline_schema(model), "example": example}}
    return {"requestBody": {"required": True, "content": content}}


def allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """Every method some route of ``app`` serves at the request's path."""
    methods: set[str] = set()
    scope = {**request.scope, "method": "GET"}
    for route in app.router.routes:
        if isinstance(route, Route) and route.methods and route.matches(scope)[0] is not Match.NONE:
            methods |= route.methods
    return sorted(methods)


def _envelope(
    status: int, kind: str, message: str, headers: Mapping[str, str] | None = None, render: Render = render_error
) -> Response:
    body = json.dumps(render(status, kind, message), separators=(",", ":")).encode()
    return Response(body, status_code=status, media_type="application/json", headers=dict(headers or {}))


def install_error_handlers(
    app: FastAPI, *, model: type[BaseModel] = ErrorEnvelope, render: Render = render_error
) -> None:
    """Render the router's refusals (unknown path, undeclared method, refused parameter) in the envelope.

    ``model`` and ``render``: the envelope's schema and its body, when the service's carries more.
    """

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, StarletteHTTPException) else 500
        detail = exc.detail if isinstance(exc, StarletteHTTPException) else "error"
        message = f"{request.method} {request.url.path}: {detail}"
        log.warning("request refused %s %s: %d", request.method, request.url.path, status)
        if status == 405:
            allow = ", ".join(allowed_methods(app, request))
            return _envelope(405, "method_not_allowed", f"{message} (allowed: {allow})", {"Allow": allow}, render)
        return _envelope(status, {404: "not_found"}.get(status, "http_error"), message, render=render)

    async def validation_error(request: Request, exc: Exception) -> Response:
        problems = exc.errors() if isinstance(exc, RequestValidationError) else []
        text = describe_problems(problems) or "invalid request"
        return _envelope(400, "invalid_request", text[:500], render=render)

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _validation_is_400(generate(), model, render)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


_FASTAPI_422 = ("HTTPValidationError", "ValidationError")


def _validation_is_400(doc: dict[str, Any], model: type[BaseModel], render: Render) -> dict[str, Any]:
    """FastAPI documents 422 ``HTTPValidationError`` on every operation it validates; this app answers 400."""
    invalid = error_responses({400: ("a parameter breaks its schema", "invalid_request")}, model=model, render=render)
    added = False
    for item in doc.get("paths", {}).values():
        for operation in item.values():
            responses = operation.get("responses", {}) if isinstance(operation, dict) else {}
            if responses.pop("422", None) is not None and "400" not in responses:
                example = invalid[400]["content"]["application/json"]["example"]
                schema = {"$ref": f"#/components/schemas/{model.__name__}"}
                content = {"application/json": {"schema": schema, "example": example}}
                responses["400"] = {"description": invalid[400]["description"], "content": content}
                added = True
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in _FASTAPI_422:
        schemas.pop(name, None)
    if added:
        envelope = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(envelope.pop("$defs", {}), **{model.__name__: envelope})
    if not schemas:
        del doc["components"]
    return doc
