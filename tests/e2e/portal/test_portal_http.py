"""The portal over HTTP (no browser): sign-in, the session cookie, CSRF, roles, bad input beside the field."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
from conftest import Site, csrf_of

from cvmotion.control.auth import Role
from cvmotion.control.portal.charts import histogram_svg
from cvmotion.control.portal.views_events import series
from cvmotion.control.portal.vmview import moves_of

VM = "/subscriptions/default/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{name}"


def _wait_running(site: Site, rg: str, name: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        vm = site.api("GET", VM.format(rg=rg, name=name)).json()
        if vm["properties"]["provisioningState"] == "Succeeded":
            return
        site.ctl.wake_workers()
        time.sleep(0.05)
    raise AssertionError(f"{name} did not settle")


def test_signin_cookie_and_redirects(site: Site) -> None:
    anonymous = httpx.get(site.url + "/portal/vms", follow_redirects=False)
    assert anonymous.status_code == 303
    assert anonymous.headers["location"].startswith("/portal/signin?next=/portal/vms")
    bad = httpx.post(site.url + "/portal/signin", data={"token": "cvm_not-a-token", "next": "/portal/vms"})
    assert bad.status_code == 401
    assert "not known to this controller" in bad.text
    assert 'aria-invalid="true"' in bad.text
    good = httpx.post(site.url + "/portal/signin", data={"token": site.owner, "next": "//evil.example/x"})
    assert good.status_code == 303
    assert good.headers["location"] == "/portal/vms"  # never an open redirect
    cookie = good.headers["set-cookie"].lower()
    assert "httponly" in cookie
    assert "samesite=strict" in cookie
    assert "path=/" in cookie
    # Another site's page cannot sign this browser in (login CSRF), nor post a form with a stolen CSRF token.
    foreign = {"Origin": "https://evil.example"}
    assert httpx.post(site.url + "/portal/signin", data={"token": site.owner}, headers=foreign).status_code == 401
    with site.signed_in(site.owner) as web:
        csrf = csrf_of(web.get("/portal/vms/new").text)
        form = {"csrf": csrf, "name": "x2", "resource_group": "rg", "size": "Standard_DC2as_v5", "image": "kvstore"}
        assert web.post("/portal/vms/review", data=form, headers=foreign).status_code == 403
        assert web.post("/portal/vms/review", data=form, headers={"Origin": site.url}).status_code == 200
    # A host's registration token is no user.
    host = site.token(Role.HOST)
    assert httpx.post(site.url + "/portal/signin", data={"token": host}).status_code == 401


def test_portal_is_not_in_the_api_document(site: Site) -> None:
    paths = httpx.get(site.url + "/openapi.json").json()["paths"]
    assert not [p for p in paths if p.startswith("/portal") or p == "/"]


def test_create_with_field_errors_then_policy_refusal(site: Site) -> None:
    with site.signed_in(site.owner) as web:
        blade = web.get("/portal/vms/new")
        assert "Enable confidential live migration" in blade.text
        csrf = csrf_of(blade.text)
        bad = web.post(
            "/portal/vms/review",
            data={"csrf": csrf, "name": "-bad name", "resource_group": "", "size": "Standard_XL", "image": "kvstore"},
        )
        assert bad.status_code == 422
        assert 'id="name-error"' in bad.text
        assert "Use 1–40 letters" in bad.text
        assert 'id="resource_group-error"' in bad.text
        assert 'id="size-error"' in bad.text
        # Without the CSRF token the form is refused and nothing is created.
        forged = web.post(
            "/portal/vms", data={"name": "x1", "resource_group": "rg", "size": "Standard_DC2as_v5", "image": "kvstore"}
        )
        assert forged.status_code == 403
        assert site.api("GET", VM.format(rg="rg", name="x1")).status_code == 404

        site.api(
            "PUT",
            "/subscriptions/default/resourceGroups/locked/providers/Microsoft.Authorization/policyAssignments/no-clm",
            {"properties": {"policyDefinitionId": "deny-confidential-live-migration"}},
        )
        form = {
            "csrf": csrf,
            "name": "vm1",
            "resource_group": "locked",
            "size": "Standard_DC2as_v5",
            "image": "kvstore",
            "clm": "on",
            "step": "create",
        }
        refused = web.post("/portal/vms", data=form)
        assert refused.status_code == 403
        assert "RequestDisallowedByPolicy" in refused.text
        assert "no-clm" in refused.text
        form |= {"resource_group": "open"}
        made = web.post("/portal/vms", data=form)
        assert made.status_code == 303, made.text
        assert made.headers["location"] == "/portal/vms/default/open/vm1"
        _wait_running(site, "open", "vm1")
        page = web.get("/portal/vms/default/open/vm1")
        assert page.status_code == 200
        assert 'data-testid="vm-clm">Enabled<' in page.text


def test_reader_sees_no_buttons_and_cannot_post(site: Site) -> None:
    site.api(
        "PUT",
        VM.format(rg="rg1", name="web"),
        {
            "properties": {
                "hardwareProfile": {"vmSize": "Standard_DC2as_v5"},
                "storageProfile": {"imageReference": {"id": "kvstore"}},
            }
        },
    )
    _wait_running(site, "rg1", "web")
    with site.signed_in(site.token(Role.READER)) as web:
        listing = web.get("/portal/vms")
        assert "web" in listing.text
        assert "+ Create" not in listing.text
        vm = web.get("/portal/vms/default/rg1/web")
        assert "Live-migrate now" not in vm.text
        assert "Delete" not in vm.text
        assert "clm-toggle" not in vm.text
        assert "/portal/hosts/h1/drain" not in web.get("/portal/hosts/h1").text
        assert "Assign a policy" not in web.get("/portal/policy").text
        # The forged request (with a valid CSRF token) is refused by the API itself.
        csrf = csrf_of(web.get("/portal/vms/new").text)
        forged = web.post(
            "/portal/vms",
            data={
                "csrf": csrf,
                "name": "r1",
                "resource_group": "rg1",
                "size": "Standard_DC2as_v5",
                "image": "kvstore",
                "step": "create",
            },
        )
        assert forged.status_code == 403
        assert "AuthorizationFailed" in forged.text
        drained = web.post("/portal/hosts/h1/drain", data={"csrf": csrf, "reason": "SecurityUpdate"})
        assert drained.status_code in (403, 501)
        assert site.api("GET", VM.format(rg="rg1", name="r1")).status_code == 404


def test_pages_render(site: Site) -> None:
    with site.signed_in(site.owner) as web:
        for path in (
            "/portal/hosts",
            "/portal/policy",
            "/portal/events",
            "/portal/charts",
            "/portal/vms/table",
            "/portal/hosts/table",
            "/portal/hosts/h1",
            "/portal/hosts/h1/live",
        ):
            page = web.get(path)
            assert page.status_code == 200, (path, page.text[-500:])
        assert web.get("/portal/static/htmx-2.0.11.min.js").status_code == 200
        assert web.get("/portal/static/..%2Fsession.py").status_code == 404
        policy = web.get("/portal/policy")
        bad = web.post(
            "/portal/policy/assignments",
            data={
                "csrf": csrf_of(policy.text),
                "name": "p1",
                "definition": "allowed-host-pools",
                "pools": "",
                "effect": "deny",
            },
        )
        assert bad.status_code == 422
        assert 'id="pools-error"' in bad.text
        good = web.post(
            "/portal/policy/assignments",
            data={
                "csrf": csrf_of(policy.text),
                "name": "p1",
                "definition": "allowed-host-pools",
                "pools": "pool-a",
                "effect": "deny",
            },
        )
        assert good.status_code == 303
        assert "pool-a" in web.get("/portal/policy").text


def test_histogram_svg_says_its_numbers() -> None:
    svg = str(histogram_svg([21.0, 25.0, 300.0], title="Downtime <live>", unit="ms"))
    assert svg.startswith("<svg")
    assert 'role="img"' in svg
    assert "Downtime &lt;live&gt;" in svg  # escaped, never markup
    assert "3 values; median 25 ms, p99 300 ms, max 300 ms" in svg
    assert "No data yet" in str(histogram_svg([], title="Pauses", unit="ms"))


def test_moves_pair_tokens_with_their_move() -> None:
    old = {"tokenId": "t-old", "chipId": "aa" * 32, "tcb": "bl=1", "platform": "emulated"}
    new = {"tokenId": "t-new", "chipId": "bb" * 32, "tcb": "bl=2", "platform": "emulated"}
    events = [
        {"id": "1", "type": "cvmotion.migration.completed", "time": "2026-12-04T18:00:00.000Z",
         "data": {"operation": "op-1", "downtimeMs": 20}},
        {"id": "2", "type": "cvmotion.vm.postMigrationAttestation", "data": {"vm": "v", "old": old, "new": new}},
        {"id": "3", "type": "cvmotion.maintenance.fallback", "time": "2026-12-04T18:05:00.000Z",
         "data": {"vm": "v", "from": "hb", "method": "MemoryPreservingUpdate", "pauseMs": 310}},
        {"id": "4", "type": "cvmotion.vm.postMigrationAttestation", "data": {"vm": "v", "old": new, "new": old}},
    ]  # fmt: skip
    ops = [{"id": "op-1", "name": "Migrate", "host": "ha", "targetHost": "hb", "status": "Succeeded",
            "createdAt": 1796407100.0}]  # fmt: skip

    async def run() -> list[dict[str, Any]]:
        async with httpx.AsyncClient() as client:
            return await moves_of(client, ops, {}, events)

    moves = asyncio.run(run())
    assert [m["method"] for m in moves] == ["MemoryPreservingUpdate", "LiveMigration"]
    assert (moves[1]["token_before"], moves[1]["token_after"]) == ("t-old", "t-new")
    assert (moves[0]["token_before"], moves[0]["downtime_ms"]) == ("t-new", 310)


def test_charts_count_each_move_once() -> None:
    vm = "/subscriptions/default/resourcegroups/rg/providers/microsoft.compute/virtualmachines/v"
    events = [
        # An operator's move: the worker's event and its operation.
        {"id": "1", "type": "Cvmotion.Fabric.VmMigrated", "subject": vm, "data": {"downtime": 20, "total-time": 100}},
        {"id": "2", "type": "Cvmotion.Fabric.OperationSucceeded", "subject": vm, "data": {"operation": "op-1"}},
        # A drained move: the worker found the VM arrived (no timings); the ladder measured it.
        {"id": "3", "type": "Cvmotion.Fabric.VmMigrated", "subject": vm, "data": {"from": "ha", "to": "hb"}},
        {"id": "4", "type": "Cvmotion.Fabric.OperationSucceeded", "subject": vm, "data": {"operation": "op-2"}},
        {"id": "5", "type": "cvmotion.migration.completed", "subject": vm,
         "data": {"operation": "op-2", "downtimeMs": 30, "totalMs": 200}},
        {"id": "6", "type": "cvmotion.maintenance.fallback", "subject": vm, "data": {"pauseMs": 310}},
    ]  # fmt: skip
    assert series(events) == {"downtime": [20.0, 30.0], "total": [100.0, 200.0], "pause": [310.0]}


def test_drain_cancel_and_uncordon_through_the_portal(site: Site) -> None:
    props = {
        "hardwareProfile": {"vmSize": "Standard_DC2as_v5"},
        "securityProfile": {"confidentialLiveMigration": "Enabled"},
        "storageProfile": {"imageReference": {"id": "kvstore"}},
        "placement": {"host": "h1"},
    }
    body = {"properties": props}
    assert site.api("PUT", VM.format(rg="rg1", name="d1"), body).status_code == 202
    _wait_running(site, "rg1", "d1")
    with site.signed_in(site.owner) as web:
        csrf = csrf_of(web.get("/portal/hosts/h1").text)
        bad = web.post("/portal/hosts/h1/drain", data={"csrf": csrf, "reason": "Reboot", "notice": "x"})
        assert bad.status_code == 422
        assert 'id="reason-error"' in bad.text
        late = web.post("/portal/hosts/h1/drain", data={"csrf": csrf, "reason": "SecurityUpdate", "notice": "-1"})
        assert late.status_code == 422
        assert 'id="notice-error"' in late.text
        # A long notice keeps the VM's move scheduled, so the drain is still running when it is cancelled.
        started = web.post("/portal/hosts/h1/drain", data={"csrf": csrf, "reason": "SecurityUpdate", "notice": "600"})
        assert started.status_code == 303, started.text
        page = web.get("/portal/hosts/h1")
        assert 'data-testid="host-state"><span class="state state-draining">Draining' in page.text
        assert "Running" in web.get("/portal/hosts/h1/live").text or "Accepted" in page.text
        assert web.post("/portal/hosts/h1/drain", data={"csrf": csrf, "reason": "SecurityUpdate"}).status_code == 409
        assert web.post("/portal/hosts/h1/cancel", data={"csrf": csrf}).status_code == 303
        deadline = time.monotonic() + 30
        while "Draining" in (state := web.get("/portal/hosts/h1").text) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "state-cordoned" in state
        assert web.post("/portal/hosts/h1/uncordon", data={"csrf": csrf}).status_code == 303
        assert "state-available" in web.get("/portal/hosts/h1").text
        assert web.post("/portal/hosts/h1/reboot", data={"csrf": csrf}).status_code == 404


def test_events_stream_sends_ids_and_resumes(site: Site) -> None:
    with site.signed_in(site.owner) as web:
        ids: list[int] = []
        with web.stream("GET", "/portal/events/stream", params={"after": "0", "kind": "hosts"}) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            for line in stream.iter_lines():
                if line.startswith("id: "):
                    ids.append(int(line.removeprefix("id: ")))
                assert "<script" not in line
                if len(ids) == 3:  # the three hosts' registrations
                    break
        assert ids == sorted(ids)
        # Resuming after the second: the third comes first (Last-Event-ID, as a reconnecting browser sends it).
        headers = {"Last-Event-ID": str(ids[1])}
        with web.stream("GET", "/portal/events/stream", params={"kind": "hosts"}, headers=headers) as stream:
            first = next(line for line in stream.iter_lines() if line.startswith("id: "))
        assert first == f"id: {ids[2]}"


def test_audit_assignment_compliance_on_the_policy_page(site: Site) -> None:
    with site.signed_in(site.token(Role.POLICY_ADMINISTRATOR)) as web:
        csrf = csrf_of(web.get("/portal/policy").text)
        form = {"csrf": csrf, "name": "watch-clm", "definition": "deny-confidential-live-migration",
                "resource_group": "aud", "effect": "audit"}  # fmt: skip
        assert web.post("/portal/policy/assignments", data=form).status_code == 303
        body = {"properties": {"hardwareProfile": {"vmSize": "Standard_DC2as_v5"},
                               "securityProfile": {"confidentialLiveMigration": "Enabled"},
                               "storageProfile": {"imageReference": {"id": "kvstore"}}}}  # fmt: skip
        assert site.api("PUT", VM.format(rg="aud", name="a1"), body).status_code == 202  # audit: allowed
        page = web.get("/portal/policy").text
        assert "watch-clm" in page
        assert "NonCompliant" in page
        assert "+ Create" not in web.get("/portal/vms").text  # a policy administrator creates no VMs
        assignment = (
            "/subscriptions/default/resourceGroups/aud/providers/Microsoft.Authorization/policyAssignments/watch-clm"
        )
        deleted = web.post("/portal/policy/assignments/delete", data={"csrf": csrf, "id": assignment})
        assert deleted.status_code == 303
        assert 'data-assignment="watch-clm"' not in web.get("/portal/policy").text
