"""control layer (portal): the Hosts pages — the fleet's hosts, a drain with its reason, its live progress.

Capacity used is the placement's own count (the VMs recorded on each host, every subscription's), read
after the API has let the user list the hosts: a host's load is a property of the host, not of anyone's
VMs.  Everything a user changes (drain, cancel) goes through the API with the user's token.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

import httpx
from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response
from sqlalchemy.orm import Session

from cvmotion.control.placement import Candidate
from cvmotion.control.portal import drains
from cvmotion.control.portal.apiclient import ApiClient, ApiError
from cvmotion.control.portal.common import Ctx, Form, SignedIn, host_json, vm_path

__all__ = ["register"]

_HOSTS = "/providers/Cvmotion.Fabric/hosts"
_MAX_VMS = 200


def _usage(ctx: Ctx) -> dict[str, Candidate]:
    def run(session: Session) -> list[Candidate]:
        return ctx.portal.ctl.inventory.candidates(session)

    return {c.name: c for c in ctx.portal.ctl.transaction(run, write=False)}


def _host_row(host: dict[str, Any], usage: dict[str, Candidate], draining: set[str]) -> dict[str, Any]:
    props = host.get("properties", {})
    used = usage.get(host["name"])
    state = str(props.get("state", ""))
    # Available / Cordoned / Draining / Unavailable: a silent host is Unavailable whatever else is true.
    if state != "Unavailable" and host["name"] in draining:
        state = "Draining"
    elif state != "Unavailable" and props.get("cordoned"):
        state = "Cordoned"
    return {
        "name": host["name"],
        "pool": props.get("pool"),
        "product": props.get("product"),
        "tcb": props.get("reportedTcbText") or props.get("reportedTcb"),
        "chip": props.get("chipId"),
        "vcpus": props.get("capacity", {}).get("vcpus"),
        "memory": props.get("capacity", {}).get("memoryGiB"),
        "used_vcpus": used.used_vcpus if used else 0,
        "used_memory": used.used_memory_gib if used else 0,
        "vms": used.vm_count if used else 0,
        "state": state,
        "api_url": props.get("apiUrl"),
        "cordon_reason": props.get("cordonReason") or "",
    }


async def _hosts(ctx: Ctx, api: ApiClient) -> list[dict[str, Any]]:
    answer, active = await asyncio.gather(api.get(_HOSTS), drains.active_hosts(api))
    usage = await asyncio.to_thread(_usage, ctx)
    return [_host_row(h, usage, active) for h in answer.get("value", [])]


async def _progress(ctx: Ctx, api: ApiClient, host: dict[str, Any]) -> dict[str, Any]:
    """The host's drain (when the API has one) and each VM that is on the host or last moved from it.

    The VMs are the subscription's (the ones this user may read); their operations are asked concurrently,
    for at most ``_MAX_VMS`` of them (a page refreshed every second must stay cheap).
    """
    drain, vms = await asyncio.gather(
        drains.current(api, host["name"]),
        api.get(f"/subscriptions/{quote(ctx.sub, safe='')}/providers/Microsoft.Compute/virtualMachines"),
    )
    listed = vms.get("value", [])[:_MAX_VMS]

    async def latest_move(vm: dict[str, Any]) -> dict[str, Any] | None:
        parts = str(vm["id"]).split("/")
        ops = await api.get(vm_path(parts[2], parts[4], vm["name"]) + "/operations")
        return next((op for op in ops.get("value", []) if op.get("name") == "Migrate"), None)

    latest = await asyncio.gather(*(latest_move(vm) for vm in listed))
    mine = []
    async with httpx.AsyncClient() as client:
        for vm, move in zip(listed, latest, strict=True):
            parts = str(vm["id"]).split("/")
            on_host = vm["properties"]["instanceView"].get("host") == host["name"]
            if not on_host and (move is None or move.get("host") != host["name"]):
                continue
            live = None
            if move is not None and move.get("migrationId") and move.get("status") == "InProgress":
                live = await host_json(client, host["api_url"], f"/v1/migrations/{move['migrationId']}")
            mine.append({"vm": vm, "rg": parts[4], "sub": parts[2], "move": move, "live": live})
    return {"drain": drain, "vms": mine}


def register(router: APIRouter) -> None:  # noqa: C901 - one closure per route
    async def listing(ctx: Ctx) -> dict[str, Any]:
        async with ctx.api() as api:
            try:
                return {"rows": await _hosts(ctx, api), "error": None}
            except ApiError as exc:
                return {"rows": [], "error": str(exc)}

    @router.get("/portal/hosts", include_in_schema=False)
    async def hosts(ctx: SignedIn) -> Response:
        return ctx.page("hosts.html", "Hosts", "hosts", **(await listing(ctx)))

    @router.get("/portal/hosts/table", include_in_schema=False)
    async def hosts_table(ctx: SignedIn) -> Response:
        return ctx.fragment("_hosts_table.html", **(await listing(ctx)))

    async def host_data(ctx: Ctx, name: str) -> dict[str, Any]:
        async with ctx.api() as api:
            rows = await _hosts(ctx, api)
            host = next((r for r in rows if r["name"] == name), None)
            if host is None:
                raise ApiError(404, "ResourceNotFound", f"host {name!r} is not registered")
            return {"host": host, **(await _progress(ctx, api, host))}

    @router.get("/portal/hosts/{name}", include_in_schema=False)
    async def host_page(ctx: SignedIn, name: str) -> Response:
        return await page(ctx, name)

    @router.get("/portal/hosts/{name}/live", include_in_schema=False)
    async def host_live(ctx: SignedIn, name: str) -> Response:
        try:
            data = await host_data(ctx, name)
        except ApiError as exc:
            return ctx.fragment("_error.html", message=str(exc))
        return ctx.fragment("_drain.html", **data)

    async def page(ctx: Ctx, name: str, *, status: int = 200, **notes: str) -> Response:
        try:
            data = await host_data(ctx, name)
        except ApiError as exc:
            return ctx.page("error.html", "Host", "hosts", status=exc.status, message=str(exc))
        notes = {"error": "", "reason_error": "", "notice_error": ""} | notes
        return ctx.page("host.html", f"{name} — host", "hosts", status=status, **data, reasons=drains.REASONS, **notes)

    @router.post("/portal/hosts/{name}/drain", include_in_schema=False)
    async def drain(posted: Form, name: str) -> Response:
        ctx, reason, notice_text = posted.ctx, posted.form.get("reason", ""), posted.form.get("notice", "").strip()
        if reason not in drains.REASONS:
            return await page(ctx, name, status=422, reason_error="Choose the reason for the drain.")
        notice = None
        if notice_text:
            try:
                notice = float(notice_text)
            except ValueError:
                notice = -1.0
            if not 0 <= notice <= drains.MAX_NOTICE_S:
                message = f"Enter a number of seconds from 0 to {drains.MAX_NOTICE_S:.0f}, or leave it empty."
                return await page(ctx, name, status=422, notice_error=message)
        async with ctx.api() as api:
            try:
                await drains.start(api, name, reason, notice)
            except ApiError as exc:
                return await page(ctx, name, status=exc.status, error=str(exc))
        return RedirectResponse(f"/portal/hosts/{quote(name, safe='')}?sub={ctx.sub}", status_code=303)

    @router.post("/portal/hosts/{name}/{action}", include_in_schema=False)
    async def host_action(posted: Form, name: str, action: str) -> Response:
        ctx = posted.ctx
        call = {"cancel": drains.cancel, "uncordon": drains.uncordon}.get(action)
        if call is None:
            return ctx.page("error.html", "Host", "hosts", status=404, message=f"no action {action!r} on a host")
        async with ctx.api() as api:
            try:
                await call(api, name)
            except ApiError as exc:
                return await page(ctx, name, status=exc.status, error=str(exc))
        return RedirectResponse(f"/portal/hosts/{quote(name, safe='')}?sub={ctx.sub}", status_code=303)
