"""Every HTTP service does what its OpenAPI document says: Schemathesis, with every check, against a real process.

Per service (``contract_services.SERVICES``): the examples, coverage (boundary values, undeclared methods,
other media types) and fuzzing phases with positive and negative data; the state machine over the OpenAPI
links where the document has any; the served document is the app's own, and it documents every route.
Fixed seed and derandomized Hypothesis, bounded examples: the same requests on every run.  Where a
schema cannot say why a request is refused, ``schemathesis.toml`` (the one ``st run`` reads) says so.
"""

from __future__ import annotations

import hashlib
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from contract_services import CLI, SECRET_HEX, SERVICES, Fabric
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig
from schemathesis.schemas import BaseSchema

from cvmotion.abi.snp import Product
from cvmotion.attestation.client import AttestationClient
from cvmotion.attestation.keyrelease import TransferKey

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


# HTML pages a service serves beside its API (the controller's portal): kept out of the API document on purpose.
_PAGE_ROOT, _PAGES = "/", "/portal"


def _served(app: FastAPI) -> list[tuple[str, set[str] | None, bool]]:
    """(path, methods, in the schema) of every route, an included router's routes one by one.

    FastAPI 0.16x keeps an included router as one entry of ``app.routes`` (no ``path``) that yields its routes.
    """
    served: list[tuple[str, set[str] | None, bool]] = []
    for route in app.routes:
        contexts = getattr(route, "effective_route_contexts", None)
        if contexts is not None:
            served += [(c.path, c.methods, c.include_in_schema) for c in contexts()]
        else:
            served.append((route.path, getattr(route, "methods", None), getattr(route, "include_in_schema", True)))
    return served


def assert_routes_documented(app: FastAPI, document: dict[str, Any]) -> None:
    """Every API route of ``app`` is an operation of ``document``, and every operation a route; only pages hide."""
    routes = [(path, methods, shown) for path, methods, shown in _served(app) if path != app.openapi_url]
    hidden = sorted(path for path, _, shown in routes if not shown)
    pages = [p for p in hidden if p == _PAGE_ROOT or p.startswith(_PAGES)]
    assert hidden == pages, "an API route kept out of the document"
    served = {
        (method.lower(), path)
        for path, methods, shown in routes
        if shown
        for method in methods or {"(any)"}
        if method != "HEAD"  # RFC 9110: every GET resource answers HEAD; OpenAPI leaves it implied
    }
    documented = {(m, path) for path, item in document["paths"].items() for m in item if m in HTTP_METHODS}
    assert sorted(served - documented) == [], "served but not in the OpenAPI document"
    assert sorted(documented - served) == [], "in the OpenAPI document but not served"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_document_is_the_apps_and_every_route_is_in_it(name: str, fabric: Fabric) -> None:
    app = SERVICES[name].app(fabric)
    document = app.openapi()
    assert httpx.get(f"{fabric.url(name)}/openapi.json", timeout=30).json() == document
    assert_routes_documented(app, document)
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
            suppress_health_check=[HealthCheck.too_slow],
        )
    )


def test_the_documented_successes_with_real_data(fabric: Fabric) -> None:
    """Generated requests rarely name a real chip or carry genuine evidence: the 200s, each checked too."""
    kds = _load(fabric, "kds")
    for product, chip in fabric.chips.items():
        tcb = chip.reported_tcb
        query = {"blSPL": tcb.boot_loader, "teeSPL": tcb.tee, "snpSPL": tcb.snp, "ucodeSPL": tcb.microcode}
        if product is Product.TURIN:
            query["fmcSPL"] = tcb.fmc
        case = kds[f"/vcek/v1/{product.value}/{{hwid}}"]["GET"].Case(
            path_parameters={"hwid": chip.hwid.hex()}, query=query
        )
        assert case.call_and_validate().status_code == 200
    # A guest's report binding its transfer key; the attestation service fetches the VCEK from the KDS.
    transfer = TransferKey.generate()
    runtime = transfer.runtime_data()
    report = fabric.base / "guest-report.bin"
    made = subprocess.run(
        [*CLI, "platform", "report", "--data-dir", str(fabric.chips[Product.GENOA].data_dir),
         "--report-data", hashlib.sha256(runtime).hexdigest(), "--out", str(report)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    evidence = AttestationClient.evidence_body(report.read_bytes(), None, runtime, data_type="JSON", nonce="contract")
    attest = _load(fabric, "attestation")["/attest/SevSnpVm"]["POST"]
    answer = attest.Case(body=evidence, media_type="application/json").call_and_validate()
    assert answer.status_code == 200, answer.text
    release = _load(fabric, "key-release")["/keys/{name}/release"]["POST"]
    case = release.Case(
        path_parameters={"name": "data-key"}, body={"target": answer.json()["token"]}, media_type="application/json"
    )
    released = case.call_and_validate()
    assert released.status_code == 200, released.text
    assert transfer.unwrap(released.json()["value"]) == bytes.fromhex(SECRET_HEX)
