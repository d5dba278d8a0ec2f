"""control.api + services: ARM-shaped requests against an in-process controller and simulated hosts."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
from control_harness import RG, VMS, Api

from cvmotion.control.auth import Role
from cvmotion.control.db import Host
from cvmotion.testing.fakehost import FakeHost

POLICY = "providers/Microsoft.Authorization"


def assign(api: Api, scope: str, name: str, definition: str, params: dict[str, object] | None = None) -> None:
    body = {
        "properties": {"policyDefinitionId": f"/{POLICY}/policyDefinitions/{definition}", "parameters": params or {}}
    }
    response = api.req("PUT", f"{scope}/{POLICY}/policyAssignments/{name}", body)
    assert response.status_code == 200, response.text


def test_create_is_long_running_and_places_on_a_host(api: Api, fakehosts: dict[str, FakeHost]) -> None:
    response = api.create("rg1", "web")
    assert response.status_code == 202
    assert response.json()["properties"]["provisioningState"] == "Creating"
    assert api.wait(response)["status"] == "Succeeded"
    vm = api.req("GET", f"{RG}/rg1/{VMS}/web").json()
    view = vm["properties"]["instanceView"]
    assert vm["id"] == f"{RG}/rg1/{VMS}/web"
    assert vm["properties"]["provisioningState"] == "Succeeded"
    assert vm["properties"]["securityProfile"]["confidentialLiveMigration"] == "Disabled"
    assert view["powerState"] == "running"
    assert view["liveMigration"] == {
        "eligible": False,
        "reasons": ["ConfidentialLiveMigrationDisabled: the VM has not opted in"],
    }
    host = fakehosts[view["host"]]
    spec = host.vms[view["hostVmName"]]["spec"]
    bound = json.loads(base64.b64decode(spec["migration_policy"]))
    assert bound["allowed_pools"] == ["pool-a", "pool-b"]
    assert spec["size"] == "Standard_DC2as_v5"


def test_spread_over_hosts(api: Api) -> None:
    hosts = set()
    for i in range(3):
        response = api.create("rg1", f"vm{i}")
        api.wait(response)
        hosts.add(api.req("GET", f"{RG}/rg1/{VMS}/vm{i}").json()["properties"]["instanceView"]["host"])
    assert hosts == {"h1", "h2", "h3"}


def test_auth(api: Api) -> None:
    assert api.req("GET", f"{RG}/rg1/{VMS}", token=None).json()["error"]["code"] == "AuthenticationFailed"
    assert api.req("GET", f"{RG}/rg1/{VMS}", token="cvm_nope").status_code == 401
    reader = api.token(Role.READER)
    assert api.req("GET", f"{RG}/rg1/{VMS}", token=reader).status_code == 200
    denied = api.create("rg1", "x").request  # owner works; now a reader tries
    assert denied is not None
    response = api.req("PUT", f"{RG}/rg1/{VMS}/y", api.vm_body(), token=reader)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "AuthorizationFailed"
    other = api.token(Role.CONTRIBUTOR, "other-sub")
    assert api.req("PUT", f"{RG}/rg1/{VMS}/y", api.vm_body(), token=other).status_code == 403
    policy_admin = api.token(Role.POLICY_ADMINISTRATOR)
    assert api.req("PUT", f"{RG}/rg1/{VMS}/y", api.vm_body(), token=policy_admin).status_code == 403
    host_token = api.token(Role.HOST)
    assert api.req("GET", "/providers/Cvmotion.Fabric/hosts", token=host_token).status_code == 403


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        pytest.param({"properties": {}}, 400, "hardwareProfile", id="missing"),
        pytest.param({"x": 1, "properties": {}}, 400, "Extra inputs", id="unknown-field"),
        pytest.param("not-an-object", 400, "valid dictionary", id="not-object"),
    ],
)
def test_bad_vm_bodies(api: Api, body: object, status: int, fragment: str) -> None:
    response = api.req("PUT", f"{RG}/rg1/{VMS}/bad", body)
    assert response.status_code == status
    assert fragment in response.json()["error"]["message"]


def test_bad_input_is_a_clear_4xx(api: Api) -> None:
    unknown_size = api.create("rg1", "a", size="Standard_XX9_v9")
    assert unknown_size.status_code == 400
    assert "unknown VM size" in unknown_size.json()["error"]["message"]
    assert api.create("rg1", "bad_name!").status_code in (400, 404)
    assert api.create("rg1", "-lead").status_code == 400
    owner = {"Authorization": f"Bearer {api.owner}"}
    malformed = api.client.put(f"{RG}/rg1/{VMS}/m", content=b"{", headers=owner | {"Content-Type": "application/json"})
    assert malformed.status_code == 400
    assert "not valid JSON" in malformed.json()["error"]["message"]
    not_json = api.client.put(f"{RG}/rg1/{VMS}/m", content=b"{}", headers=owner | {"Content-Type": "text/plain"})
    assert (not_json.status_code, not_json.json()["error"]["code"]) == (415, "UnsupportedMediaType")
    bad_policy = api.req(
        "PUT",
        f"/{POLICY}/policyDefinitions/p",
        {"properties": {"policyRule": {"if": {"field": "nope", "equals": 1}, "then": {"effect": "deny"}}}},
    )
    assert bad_policy.status_code == 400
    assert api.req("DELETE", f"{RG}/rg1/{VMS}/never").status_code == 404
    operations = "/subscriptions/default/providers/Cvmotion.Fabric/operations"
    assert api.req("GET", f"{operations}/0b8e7a5c-3f1d-4a59-9a4e-6f1b2c3d4e5f").status_code == 404
    assert api.req("GET", f"{operations}/nope").status_code == 400  # not an operation id


def test_deny_clm_policy(api: Api) -> None:
    assign(api, "/subscriptions/default/resourceGroups/locked", "no-clm", "deny-confidential-live-migration")
    response = api.create("locked", "a", clm="Enabled")
    assert response.status_code == 403
    error = response.json()["error"]
    assert error["code"] == "RequestDisallowedByPolicy"
    assert "no-clm" in error["message"]
    assert error["policyAssignment"].endswith("/policyAssignments/no-clm")
    api.wait(api.create("locked", "b"))  # opted out: allowed
    patch = {"properties": {"securityProfile": {"confidentialLiveMigration": "Enabled"}}}
    refused = api.req("PATCH", f"{RG}/locked/{VMS}/b", patch)
    assert refused.status_code == 403
    # Another resource group is outside the assignment's scope.
    assert api.create("free", "c", clm="Enabled").status_code == 202


def test_allowed_pools_policy(api: Api, fakehosts: dict[str, FakeHost]) -> None:
    assign(api, "/subscriptions/default", "pools", "allowed-host-pools", {"allowedHostPools": {"value": ["pool-b"]}})
    api.wait(api.create("rg1", "a"))
    vm = api.req("GET", f"{RG}/rg1/{VMS}/a").json()
    assert vm["properties"]["instanceView"]["host"] == "h3"
    assert vm["properties"]["instanceView"]["allowedHostPools"] == ["pool-b"]
    pinned = api.create("rg1", "b", host="h1")
    assert pinned.status_code == 403
    assert pinned.json()["error"]["code"] == "RequestDisallowedByPolicy"


def test_migrate_opt_in_and_policy(api: Api, fakehosts: dict[str, FakeHost]) -> None:
    api.wait(api.create("rg1", "off"))
    refused = api.req("POST", f"{RG}/rg1/{VMS}/off/migrate", {})
    assert refused.status_code == 409
    assert "ConfidentialLiveMigrationDisabled" in refused.json()["error"]["message"]

    api.wait(api.create("rg1", "on", clm="Enabled", host="h1"))
    moved = api.req("POST", f"{RG}/rg1/{VMS}/on/migrate", {"targetHost": "h2"})
    assert moved.status_code == 202
    assert api.wait(moved)["status"] == "Succeeded"
    vm = api.req("GET", f"{RG}/rg1/{VMS}/on").json()
    assert vm["properties"]["instanceView"]["host"] == "h2"
    assert vm["properties"]["instanceView"]["hostVmName"] in fakehosts["h2"].vms
    assert vm["properties"]["instanceView"]["hostVmName"] not in fakehosts["h1"].vms

    # A stricter assignment made after launch is honoured for the existing VM.
    assign(
        api,
        "/subscriptions/default/resourceGroups/rg1",
        "pools",
        "allowed-host-pools",
        {"allowedHostPools": ["pool-a"]},
    )
    to_b = api.req("POST", f"{RG}/rg1/{VMS}/on/migrate", {"targetHost": "h3"})
    assert to_b.status_code == 403
    assert "pools" in to_b.json()["error"]["message"]
    assign(api, "/subscriptions/default", "deny", "deny-confidential-live-migration")
    view = api.req("GET", f"{RG}/rg1/{VMS}/on").json()["properties"]["instanceView"]
    assert view["liveMigration"]["eligible"] is False
    assert any(r.startswith("DisallowedByPolicy: assignment deny") for r in view["liveMigration"]["reasons"])
    denied = api.req("POST", f"{RG}/rg1/{VMS}/on/migrate", {})
    assert denied.status_code in (403, 409)


def test_delete_and_delete_again(api: Api, fakehosts: dict[str, FakeHost]) -> None:
    api.wait(api.create("rg1", "d"))
    name = api.req("GET", f"{RG}/rg1/{VMS}/d").json()["properties"]["instanceView"]["hostVmName"]
    response = api.req("DELETE", f"{RG}/rg1/{VMS}/d")
    assert response.status_code == 202
    assert api.wait(response)["status"] == "Succeeded"
    assert all(name not in h.vms for h in fakehosts.values())
    again = api.req("DELETE", f"{RG}/rg1/{VMS}/d")
    assert again.status_code == 404
    assert again.json()["error"]["code"] == "ResourceNotFound"


def test_put_again_updates_only_what_may_change(api: Api) -> None:
    api.wait(api.create("rg1", "u"))
    same = api.create("rg1", "u", clm="Enabled")
    assert same.status_code == 200
    assert same.json()["properties"]["securityProfile"]["confidentialLiveMigration"] == "Enabled"
    resized = api.create("rg1", "u", size="Standard_DC4as_v5")
    assert resized.status_code == 409
    assert "vmSize" in resized.json()["error"]["message"]


def test_host_identity_is_bound_and_sweep_marks_unavailable(api: Api, fakehosts: dict[str, FakeHost]) -> None:
    twin = fakehosts["h1"].registration() | {"chip_id": "ab" * 32}
    response = api.req("POST", "/providers/Cvmotion.Fabric/hosts/register", twin)
    assert response.status_code == 409
    assert "bound to its chip" in response.json()["error"]["message"]
    api.wait(api.create("rg1", "r", host="h1"))
    # A report assembled before the VM arrived but answered after: not evidence that the VM is missing (the
    # host sends one report at a time, so only the one after it is known to have been assembled later).
    assert api.req("POST", "/providers/Cvmotion.Fabric/hosts/h1/heartbeat", {"vms": []}).status_code == 200
    with api.ctl.session() as s:
        assert api.ctl.inventory.sweep(s) == []
    assert api.req("GET", f"{RG}/rg1/{VMS}/r").json()["properties"]["instanceView"]["powerState"] == "running"
    # h1 reports again, still without it (its process is gone, say).
    assert api.req("POST", "/providers/Cvmotion.Fabric/hosts/h1/heartbeat", {"vms": []}).status_code == 200
    with api.ctl.session() as s:
        api.ctl.inventory.sweep(s, now=time.time() + 3600)
        assert s.get(Host, "h1") is not None
    hosts = {h["name"]: h for h in api.req("GET", "/providers/Cvmotion.Fabric/hosts").json()["value"]}
    assert hosts["h1"]["properties"]["state"] == "Unavailable"
    view = api.req("GET", f"{RG}/rg1/{VMS}/r").json()["properties"]["instanceView"]
    assert view["powerState"] == "unknown"  # h1's report did not list it: investigated, not re-created
    beat = api.req("POST", "/providers/Cvmotion.Fabric/hosts/h1/heartbeat", {"vms": [view["hostVmName"]]})
    assert beat.json()["state"] == "Available"
    with api.ctl.session() as s:
        api.ctl.inventory.sweep(s)
    assert api.req("GET", f"{RG}/rg1/{VMS}/r").json()["properties"]["instanceView"]["powerState"] == "running"


def test_deployment_template(api: Api) -> None:
    template = {
        "parameters": {"name": {"type": "string"}},
        "resources": [
            {
                "type": "Microsoft.Compute/virtualMachines",
                "apiVersion": "2024-03-01",
                "name": "[parameters('name')]",
                "location": "[resourceGroup().location]",
                "properties": {
                    "hardwareProfile": {"vmSize": "Standard_DC2as_v5"},
                    "securityProfile": {"securityType": "ConfidentialVM", "confidentialLiveMigration": "Enabled"},
                    "storageProfile": {"imageReference": {"id": "memdirty"}},
                },
            }
        ],
    }
    body = {"properties": {"template": template, "parameters": {"name": {"value": "tpl"}}}}
    response = api.req("PUT", f"{RG}/rg1/providers/Microsoft.Resources/deployments/d1", body)
    assert response.status_code == 202, response.text
    assert set(response.json()["properties"]["operations"]) == {"tpl"}
    bad = api.req(
        "PUT", f"{RG}/rg1/providers/Microsoft.Resources/deployments/d2", {"properties": {"template": {"outputs": {}}}}
    )
    assert bad.status_code == 400
    assert "outputs" in bad.json()["error"]["message"]


def test_openapi_and_events(api: Api) -> None:
    assert "/providers/Cvmotion.Fabric/hosts" in api.client.get("/openapi.json").json()["paths"]
    api.wait(api.create("rg1", "e"))
    types = [e["type"] for e in api.req("GET", "/providers/Cvmotion.Fabric/events").json()["value"]]
    assert "Cvmotion.Fabric.VmCreated" in types


def test_database_down_at_start_is_a_clear_error(tmp_path: Path) -> None:
    from cvmotion.control.service import connect_with_retry
    from cvmotion.errors import UsageError
    from cvmotion.testing.hosts import free_port

    with pytest.raises(UsageError, match="unreachable after 2 tries"):
        connect_with_retry(f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none", attempts=2)


def test_audit_records_compliance(api: Api) -> None:
    assign(api, "/subscriptions/default", "audit-clm", "deny-confidential-live-migration", {"effect": "audit"})
    assert api.create("rg1", "opted", clm="Enabled").status_code == 202  # audit never refuses
    assert api.create("rg1", "plain").status_code == 202
    states = api.req(
        "GET", "/subscriptions/default/providers/Microsoft.PolicyInsights/policyStates/latest/queryResults"
    ).json()["value"]
    by_vm = {s["resourceId"].rsplit("/", 1)[-1]: s["complianceState"] for s in states}
    assert by_vm == {"opted": "NonCompliant", "plain": "Compliant"}


def test_delete_waits_for_a_create_to_settle(api: Api, fakehosts: dict[str, FakeHost]) -> None:
    from cvmotion.testing.hosts import free_port

    # A host that never answers: the create stays in progress (retried with backoff) for seconds.
    dead = fakehosts["h1"].registration() | {"name": "dead", "chip_id": "cd" * 32}
    dead["api_url"] = f"http://127.0.0.1:{free_port()}"
    assert api.req("POST", "/providers/Cvmotion.Fabric/hosts/register", dead).status_code == 200
    assert api.create("rg1", "busy", host="dead").status_code == 202
    refused = api.req("DELETE", f"{RG}/rg1/{VMS}/busy")
    assert refused.status_code == 409
    assert "Creating" in refused.json()["error"]["message"]


def test_events_follow_is_server_sent_events(api: Api) -> None:
    headers = {"Authorization": f"Bearer {api.owner}"}
    with api.client.stream("GET", "/providers/Cvmotion.Fabric/events?follow=true&limit=1", headers=headers) as sse:
        assert sse.headers["content-type"].startswith("text/event-stream")
        lines = sse.iter_lines()
        first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
        assert first["specversion"] == "1.0"
        api.wait(api.create("rg1", "streamed"))  # a new event arrives on the open stream (bounded: it must)
        types = []
        for line in lines:
            if line.startswith("data: "):
                types.append(json.loads(line[6:])["type"])
                if "Cvmotion.Fabric.VmCreated" in types:
                    break
    assert "Cvmotion.Fabric.CreateAccepted" in types


def test_more_pools_than_a_migration_policy_binds_is_a_conflict_not_a_stuck_create(
    api: Api, fakehosts: dict[str, FakeHost]
) -> None:
    template = fakehosts["h1"].registration()
    for i in range(63):  # with pool-a and pool-b: 65 pools, one more than a VM's migration policy binds
        body = template | {"name": f"p{i}", "chip_id": f"{i:04x}" * 16, "pool": f"pool-{i}"}
        assert api.req("POST", "/providers/Cvmotion.Fabric/hosts/register", body).status_code == 200
    refused = api.create("rg1", "wide")
    assert refused.status_code == 409, refused.text
    assert "allowed-host-pools" in refused.json()["error"]["message"]
    assign(api, "/subscriptions/default", "pools", "allowed-host-pools", {"allowedHostPools": ["pool-a"]})
    assert api.wait(api.create("rg1", "narrow"))["status"] == "Succeeded"
