"""Every HTTP service does what its OpenAPI document says: Schemathesis, with every check, against a real process.

Per service (``contract_services.SERVICES``): the examples, coverage (boundary values, undeclared methods,
other media types) and fuzzing phases with positive and negative data; the state machine over the OpenAPI
links where the document has any; the served document is the app's own, and it documents every route.
Fixed seed and derandomized Hypothesis, bounded examples: the same requests on every run.  Where a
schema cannot say why a request is refused, ``schemathesis.toml`` (the one ``st run`` reads) says so.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from contract_services import SERVICES, Fabric
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig
from schemathesis.schemas import BaseSchema

ROOT = Path(__file__).resolve().parents[2]
SEED = 20_261_204
MAX_EXAMPLES = 25
HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


def _config() -> SchemathesisConfig:
    """The repository's ``schemathesis.toml`` with this suite's seed, budget and every check enabled."""
    doc = tomllib.loads((ROOT / "schemathesis.toml").read_text())
    doc["seed"] = SEED
    doc.setdefault("generation", {}).update({"mode": "all", "max-examples": MAX_EXAMPLES})
    doc.setdefault("checks", {})["enabled"] = True
    return SchemathesisConfig.from_dict(doc)


def _load(fabric: Fabric, name: str) -> BaseSchema:
    return schemathesis.openapi.from_url(f"{fabric.url(name)}/openapi.json", config=_config())


@pytest.fixture(scope="module", params=sorted(SERVICES))
def service_schema(request: pytest.FixtureRequest, fabric: Fabric) -> BaseSchema:
    return _load(fabric, request.param)


contract = schemathesis.pytest.from_fixture("service_schema")


@contract.parametrize()
@settings(derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_service_keeps_its_contract(case: schemathesis.Case) -> None:
    case.call_and_validate()


def _links(document: dict[str, Any]) -> list[str]:
    return [
        f"{method.upper()} {path} -> {name}"
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in HTTP_METHODS
        for response in operation.get("responses", {}).values()
        for name in response.get("links", {})
    ]


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_document_is_the_apps_and_every_route_is_in_it(name: str, fabric: Fabric) -> None:
    app = SERVICES[name].app(fabric)
    document = app.openapi()
    assert httpx.get(f"{fabric.url(name)}/openapi.json", timeout=30).json() == document
    served = {
        (method.lower(), route.path)
        for route in app.routes
        if route.path != app.openapi_url
        for method in getattr(route, "methods", None) or {"(any)"}
        if method != "HEAD"  # RFC 9110: every GET resource answers HEAD; OpenAPI leaves it implied
    }
    documented = {(m, path) for path, item in document["paths"].items() for m in item if m in HTTP_METHODS}
    assert sorted(served - documented) == [], "served but not in the OpenAPI document"
    assert sorted(documented - served) == [], "in the OpenAPI document but not served"
    assert bool(_links(document)) == SERVICES[name].stateful, _links(document)


@pytest.mark.parametrize("name", sorted(n for n, s in SERVICES.items() if s.stateful))
def test_stateful_over_the_links(name: str, fabric: Fabric) -> None:
    machine = _load(fabric, name).as_state_machine()
    machine.run(
        settings=settings(
            derandomize=True,
            deadline=None,
            max_examples=MAX_EXAMPLES,
            stateful_step_count=6,
            suppress_health_check=list(HealthCheck),
        )
    )
