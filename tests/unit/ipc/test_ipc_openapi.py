"""ipc.openapi: the router's refusals in the error envelope, 405 naming every method of a path, 400 not 422."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Query
from pydantic import BaseModel

from cvmotion.ipc.http import ServerThread, listen_socket
from cvmotion.ipc.openapi import ErrorEnvelope, error_responses, inline_schema, install_error_handlers


def _app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/items", responses=error_responses({404: ("no such item", "unknown_item")}))
    def list_items(limit: int = Query(10, ge=1, le=100)) -> dict[str, Any]:
        return {"limit": limit}

    @app.post("/items")
    def add_item() -> dict[str, Any]:
        return {}

    return app


@contextmanager
def _client() -> Iterator[httpx.Client]:
    sock, url = listen_socket("127.0.0.1", 0)
    with ServerThread(_app(), sock, url), httpx.Client(base_url=url, timeout=10) as client:
        yield client


def test_405_allow_names_every_method_served_at_the_path() -> None:
    with _client() as client:
        answer = client.put("/items")
    assert answer.status_code == 405
    assert answer.headers["allow"] == "GET, POST"  # two routes, one path: the methods of both
    assert ErrorEnvelope.model_validate(answer.json()).error.kind == "method_not_allowed"


def test_unknown_path_and_bad_parameter_are_envelopes() -> None:
    with _client() as client:
        missing, bad = client.get("/nowhere"), client.get("/items", params={"limit": "0"})
    assert (missing.status_code, missing.json()["error"]["kind"]) == (404, "not_found")
    assert (bad.status_code, bad.json()["error"]["kind"]) == (400, "invalid_request")
    assert "limit" in bad.json()["error"]["message"]


def test_document_says_400_where_fastapi_says_422() -> None:
    doc = _app().openapi()
    responses = doc["paths"]["/items"]["get"]["responses"]
    assert "422" not in responses
    assert responses["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorEnvelope"}
    assert responses["404"]["content"]["application/json"]["example"]["error"]["kind"] == "unknown_item"
    assert set(doc["components"]["schemas"]) == {"ErrorEnvelope", "ErrorDetail"}


class _Inner(BaseModel):
    value: int


class _Outer(BaseModel):
    inner: _Inner
    more: list[_Inner]


def test_inline_schema_leaves_no_references() -> None:
    schema = inline_schema(_Outer)
    assert "$ref" not in str(schema)
    assert "$defs" not in schema
    assert schema["properties"]["more"]["items"]["properties"]["value"]["type"] == "integer"
