"""control layer (portal): the Virtual machines pages — list, the Create blade, a VM's page, its opt-in."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

import httpx
from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

from cvmotion.control.portal.apiclient import ApiError
from cvmotion.control.portal.common import Ctx, Form, Posted, SignedIn, vm_path
from cvmotion.control.portal.eventsource import read_events
from cvmotion.control.portal.forms import BUILT_IN_IMAGES, VmForm, sizes
from cvmotion.control.portal.vmview import attestation_of, moves_of

__all__ = ["register"]

_HOSTS = "/providers/Cvmotion.Fabric/hosts"


def _row(vm: dict[str, Any]) -> dict[str, Any]:
    """One VM as the list shows it."""
    props = vm.get("properties", {})
    view = props.get("instanceView", {})
    parts = str(vm.get("id", "")).split("/")
    live = view.get("liveMigration", {})
    return {
        "name": vm.get("name"),
        "sub": parts[2] if len(parts) > 4 else "",
        "rg": parts[4] if len(parts) > 4 else "",
        "size": props.get("hardwareProfile", {}).get("vmSize"),
        "host": view.get("host"),
        "pool": view.get("hostPool"),
        "power": view.get("powerState"),
        "provisioning": props.get("provisioningState"),
        "clm": props.get("securityProfile", {}).get("confidentialLiveMigration"),
        "eligible": live.get("eligible"),
        "reasons": live.get("reasons", []),
        "status_message": view.get("statusMessage", ""),
    }


async def _listing(ctx: Ctx) -> dict[str, Any]:
    """The subscription's VMs as rows, or the API's refusal in words."""
    async with ctx.api() as api:
        try:
            answer = await api.get(
                f"/subscriptions/{quote(ctx.sub, safe='')}/providers/Microsoft.Compute/virtualMachines"
            )
        except ApiError as exc:
            return {"rows": [], "error": str(exc)}
    return {"rows": [_row(vm) for vm in answer.get("value", [])], "error": None}


def register(router: APIRouter) -> None:  # noqa: C901 - one closure per route
    @router.get("/portal/vms", include_in_schema=False)
    async def vms(ctx: SignedIn) -> Response:
        return ctx.page("vms.html", "Virtual machines", "vms", **(await _listing(ctx)))

    @router.get("/portal/vms/table", include_in_schema=False)
    async def vms_table(ctx: SignedIn) -> Response:
        return ctx.fragment("_vms_table.html", **(await _listing(ctx)))

    def blade(ctx: Ctx, form: VmForm, *, status: int = 200, refusal: ApiError | None = None) -> Response:
        return ctx.page(
            "vm_new.html",
            "Create a virtual machine",
            "vms",
            status=status,
            form=form,
            sizes=sizes(),
            images=BUILT_IN_IMAGES,
            refusal=refusal,
        )

    @router.get("/portal/vms/new", include_in_schema=False)
    async def new_vm(ctx: SignedIn) -> Response:
        form = VmForm(subscription=ctx.sub, resource_group=ctx.request.query_params.get("rg", "")[:90])
        return blade(ctx, form)

    @router.post("/portal/vms/review", include_in_schema=False)
    async def review(posted: Form) -> Response:
        ctx, form = posted.ctx, VmForm.parse(posted.form)
        if form.errors:
            return blade(ctx, form, status=422)
        return ctx.page("vm_review.html", "Review + create", "vms", form=form, refusal=None)

    @router.post("/portal/vms", include_in_schema=False)
    async def create(posted: Form) -> Response:
        ctx, form = posted.ctx, VmForm.parse(posted.form)
        if form.errors or posted.form.get("step") == "edit":
            return blade(ctx, form, status=422 if form.errors else 200)
        async with ctx.api() as api:
            try:
                await api.call("PUT", vm_path(form.subscription, form.resource_group, form.name), form.body())
            except ApiError as exc:
                # A policy refusal (or any other) is shown on the review step, in the API's words.
                return ctx.page("vm_review.html", "Review + create", "vms", status=exc.status, form=form, refusal=exc)
        target = f"/portal/vms/{form.subscription}/{form.resource_group}/{form.name}"
        return RedirectResponse(target, status_code=303)

    async def gather(ctx: Ctx, sub: str, rg: str, name: str) -> dict[str, Any]:
        async with ctx.api() as api:
            vm = await api.get(vm_path(sub, rg, name))
            ops, hosts_answer = await asyncio.gather(api.get(vm_path(sub, rg, name) + "/operations"), api.get(_HOSTS))
            hosts = {h["name"]: h for h in hosts_answer.get("value", [])}
            try:
                events = await read_events(api, subject=str(vm["id"]), limit=500)
            except ApiError:
                events = []
        async with httpx.AsyncClient() as client:
            attestation, moves = await asyncio.gather(
                attestation_of(client, vm, hosts),
                moves_of(client, ops.get("value", []), hosts, events, ctx.portal.migration_stats),
            )
        host = hosts.get(vm["properties"]["instanceView"].get("host") or "")
        return {"vm": vm, "row": _row(vm), "attestation": attestation, "moves": moves, "host": host}

    @router.get("/portal/vms/{sub}/{rg}/{name}", include_in_schema=False)
    async def vm_page(ctx: SignedIn, sub: str, rg: str, name: str) -> Response:
        try:
            data = await gather(ctx, sub, rg, name)
        except ApiError as exc:
            return ctx.page("error.html", "Virtual machine", "vms", status=exc.status, message=str(exc))
        return ctx.page("vm.html", f"{name} — virtual machine", "vms", **data)

    @router.get("/portal/vms/{sub}/{rg}/{name}/live", include_in_schema=False)
    async def vm_live(ctx: SignedIn, sub: str, rg: str, name: str) -> Response:
        try:
            data = await gather(ctx, sub, rg, name)
        except ApiError as exc:
            return ctx.fragment("_error.html", message=str(exc))
        return ctx.fragment("_vm_live.html", **data)

    async def act(posted: Posted, sub: str, rg: str, name: str, method: str, suffix: str, body: Any) -> Response:
        ctx = posted.ctx
        payload = body(posted.form) if callable(body) else body
        async with ctx.api() as api:
            try:
                await api.call(method, vm_path(sub, rg, name) + suffix, payload)
            except ApiError as exc:
                return ctx.page("error.html", "Not done", "vms", status=exc.status, message=str(exc))
        if method == "DELETE":
            return RedirectResponse(f"/portal/vms?sub={sub}", status_code=303)
        return RedirectResponse(f"/portal/vms/{sub}/{rg}/{name}", status_code=303)

    @router.post("/portal/vms/{sub}/{rg}/{name}/clm", include_in_schema=False)
    async def set_clm(posted: Form, sub: str, rg: str, name: str) -> Response:
        def body(data: dict[str, str]) -> dict[str, Any]:
            value = "Enabled" if data.get("clm") == "on" else "Disabled"
            return {"properties": {"securityProfile": {"confidentialLiveMigration": value}}}

        return await act(posted, sub, rg, name, "PATCH", "", body)

    @router.post("/portal/vms/{sub}/{rg}/{name}/migrate", include_in_schema=False)
    async def migrate(posted: Form, sub: str, rg: str, name: str) -> Response:
        return await act(posted, sub, rg, name, "POST", "/migrate", {})

    @router.post("/portal/vms/{sub}/{rg}/{name}/delete", include_in_schema=False)
    async def delete(posted: Form, sub: str, rg: str, name: str) -> Response:
        return await act(posted, sub, rg, name, "DELETE", "", None)
