"""The host API does what its OpenAPI document says: Schemathesis, every check, against a real ``cvmotion host serve``.

The host starts real work: ``POST /v1/vms`` launches a VM process (KVM where usable, else the emulated
backend), ``/migrate`` starts a migration.  So the daemon runs with a small guest memory budget (more is a
documented 409) and few examples; every VM the run created is deleted before the host stops, and the
processes it left are stopped.  The host-to-host operations are fuzzed unsigned: each answer is the
documented 401.  Fixed seed, derandomized Hypothesis: the same requests on every run.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig
from schemathesis.schemas import BaseSchema
from test_openapi_contract import HTTP_METHODS, _links

from cvmotion.firmware.vendor import Vendor
from cvmotion.host.api import create_app
from cvmotion.host.daemon import HostConfig, HostDaemon
from cvmotion.testing.hosts import HostProcess

ROOT = Path(__file__).resolve().parents[2]
SEED = 20_261_204
MAX_EXAMPLES = 8
BUDGET = "160M"  # two 64 MiB VMs at most: a third is refused (409)
SIGNED = ("/v1/migrations/incoming", "/v1/migrations/{mig_id}/outcome")

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory, emulated_vendor: Vendor) -> Iterator[HostProcess]:
    base = tmp_path_factory.mktemp("host-contract")
    started = HostProcess(
        "contract-host",
        base / "data",
        emulated_vendor.root,
        base / "pool-ca",
        extra_args=("--max-guest-memory", BUDGET),
    ).start()
    try:
        yield started
    finally:
        try:
            for name in sorted(started.vms()):  # every VM the run created, stopped and decommissioned
                started.api("DELETE", f"/v1/vms/{name}")
            assert started.vms() == {}
        finally:
            started.close()
        logs = "".join(p.read_text(errors="replace") for p in started.data_dir.glob("*.err"))
        assert "Traceback" not in logs, logs[-4000:]


def _config() -> SchemathesisConfig:
    doc = tomllib.loads((ROOT / "schemathesis.toml").read_text())
    doc["seed"] = SEED
    doc.setdefault("request-timeout", 60)
    doc.setdefault("generation", {}).update({"mode": "all", "max-examples": MAX_EXAMPLES})
    doc.setdefault("checks", {})["enabled"] = True
    return SchemathesisConfig.from_dict(doc)


def _load(host: HostProcess) -> BaseSchema:
    # A valid POST /v1/host/maintenance replaces the daemon under the test (its end-to-end test is
    # tests/e2e/host/test_inplace_update.py); its refusals are the request model's, held by the document test.
    schema = schemathesis.openapi.from_url(f"{host.url}/openapi.json", config=_config())
    return schema.exclude(operation_id="start_maintenance")


@pytest.fixture(scope="module")
def host_schema(host: HostProcess) -> BaseSchema:
    return _load(host)


# The exclusion again on the lazy schema: pytest's ``from_fixture`` rebuilds the fixture's operation filters from
# its own and the config's, so an ``exclude`` made on the fixture's schema alone is dropped (schemathesis
# 4.32: the fuzzer then replaced the daemon under itself, and requests in flight read ECONNRESET or half a
# response).  test_maintenance_is_never_fuzzed holds it.
contract = schemathesis.pytest.from_fixture("host_schema").exclude(operation_id="start_maintenance")


@contract.parametrize()
@settings(derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_host_api_keeps_its_contract(case: schemathesis.Case) -> None:
    response = case.call_and_validate()
    if case.path in SIGNED:
        assert response.status_code in (401, 405), response.text  # unsigned: refused before anything is read


def test_maintenance_is_never_fuzzed(host: HostProcess) -> None:
    """Runs after the fuzzing above (file order): no update in place started, the first daemon still serves."""
    assert not list((host.data_dir / "maintenance").glob("*.json"))
    assert host.proc is not None
    assert (host.data_dir / "daemon.pid").read_text() == str(host.proc.pid)


def test_stateful_create_show_delete(host: HostProcess) -> None:
    """Over the links of ``POST /v1/vms``; its positive cases launch a VM that runs, so the links lead somewhere."""
    schema = _load(host)

    @schema.hook
    def map_case(_: Any, case: schemathesis.Case) -> schemathesis.Case:
        positive = case.meta is not None and case.meta.generation.mode.is_positive
        if positive and case.operation.label == "POST /v1/vms" and isinstance(case.body, dict):
            case.body = {"name": case.body["name"], "image": "memdirty", "memory": "64M"}
        return case

    machine = schema.as_state_machine()
    health = [HealthCheck.too_slow, HealthCheck.filter_too_much]
    machine.run(settings=settings(derandomize=True, deadline=None, max_examples=MAX_EXAMPLES, stateful_step_count=4,
                                  suppress_health_check=health))  # fmt: skip


def test_document_is_the_apps_and_every_route_is_in_it(host: HostProcess, tmp_path: Path) -> None:
    app = create_app(HostDaemon(HostConfig(name=host.name, data_dir=tmp_path)))  # never started: no processes
    document = app.openapi()
    assert httpx.get(f"{host.url}/openapi.json", timeout=30).json() == document
    served = {
        (method.lower(), getattr(route, "path_format", route.path))
        for route in app.routes
        if route.path != "/openapi.json"
        for method in getattr(route, "methods", None) or {"(any)"}
        if method != "HEAD"  # RFC 9110: every GET resource answers HEAD; OpenAPI leaves it implied
    }
    documented = {(m, path) for path, item in document["paths"].items() for m in item if m in HTTP_METHODS}
    assert sorted(served - documented) == [], "served but not in the OpenAPI document"
    assert sorted(documented - served) == [], "in the OpenAPI document but not served"
    assert set(_links(document)) >= {"POST /v1/vms -> show_vm", "POST /v1/vms -> delete_vm"}
    for path, item in document["paths"].items():
        for method, operation in item.items():
            statuses = set(operation["responses"])
            assert "422" not in statuses, f"{method} {path}: FastAPI's default validation answer"
            refused = {s for s in statuses if s[0] in "34"}
            if "parameters" in operation or "requestBody" in operation:
                assert "400" in refused, f"{method} {path}: a refused parameter or body is undocumented"
            for status in refused:
                schema = operation["responses"][status]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorEnvelope"}, (method, path, status)
