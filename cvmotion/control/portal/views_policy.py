"""control layer (portal): the Policy page — definitions, assignments (create, delete) and audit compliance."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

from cvmotion.control.portal.apiclient import ApiClient, ApiError
from cvmotion.control.portal.common import Ctx, Form, SignedIn
from cvmotion.control.portal.forms import EFFECTS, AssignmentForm

__all__ = ["register"]

_POLICY = "providers/Microsoft.Authorization"


async def _data(ctx: Ctx, api: ApiClient) -> dict[str, Any]:
    sub = quote(ctx.sub, safe="")
    definitions, assignments, states = await asyncio.gather(
        api.get(f"/{_POLICY}/policyDefinitions"),
        api.get(f"/subscriptions/{sub}/{_POLICY}/policyAssignments"),
        api.get(f"/subscriptions/{sub}/providers/Microsoft.PolicyInsights/policyStates/latest/queryResults", limit=200),
    )
    return {
        "definitions": {d["name"]: d for d in definitions.get("value", [])},
        "assignments": assignments.get("value", []),
        "states": states.get("value", []),
        "effects": EFFECTS,
    }


def register(router: APIRouter) -> None:
    async def page(ctx: Ctx, form: AssignmentForm, *, status: int = 200, error: str | None = None) -> Response:
        async with ctx.api() as api:
            try:
                data = await _data(ctx, api)
            except ApiError as exc:
                return ctx.page("error.html", "Policy", "policy", status=exc.status, message=str(exc))
        return ctx.page("policy.html", "Policy", "policy", status=status, form=form, error=error, **data)

    @router.get("/portal/policy", include_in_schema=False)
    async def policy(ctx: SignedIn) -> Response:
        return await page(ctx, AssignmentForm(subscription=ctx.sub, definition="allowed-host-pools"))

    @router.post("/portal/policy/assignments", include_in_schema=False)
    async def assign(posted: Form) -> Response:
        ctx, data = posted.ctx, posted.form
        async with ctx.api() as api:
            try:
                definitions = {d["name"]: d for d in (await api.get(f"/{_POLICY}/policyDefinitions"))["value"]}
            except ApiError as exc:
                return ctx.page("error.html", "Policy", "policy", status=exc.status, message=str(exc))
            form = AssignmentForm.parse(data, definitions)
            if form.errors:
                return await page(ctx, form, status=422)
            try:
                await api.call(
                    "PUT", f"{form.scope}/{_POLICY}/policyAssignments/{quote(form.name, safe='')}", form.body()
                )
            except ApiError as exc:
                return await page(ctx, form, status=exc.status, error=str(exc))
        return RedirectResponse(f"/portal/policy?sub={quote(form.subscription)}", status_code=303)

    @router.post("/portal/policy/assignments/delete", include_in_schema=False)
    async def unassign(posted: Form) -> Response:
        ctx, assignment = posted.ctx, posted.form.get("id", "")
        if not assignment.startswith("/subscriptions/") or "/providers/" not in assignment or "?" in assignment:
            return await page(ctx, AssignmentForm(subscription=ctx.sub), status=422, error="Not an assignment id.")
        async with ctx.api() as api:
            try:
                await api.call("DELETE", quote(assignment))
            except ApiError as exc:
                return await page(ctx, AssignmentForm(subscription=ctx.sub), status=exc.status, error=str(exc))
        return RedirectResponse(f"/portal/policy?sub={quote(ctx.sub)}", status_code=303)
