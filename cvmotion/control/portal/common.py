"""control layer (portal): what every page needs — the signed-in user, the API client, the page frame."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import quote

import httpx
from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from cvmotion.control.auth import Action
from cvmotion.control.portal.apiclient import ApiClient
from cvmotion.control.portal.forms import read_form
from cvmotion.control.portal.render import render
from cvmotion.control.portal.session import NotSignedIn, Portal, User
from cvmotion.control.resources import SUB_NAME_PATTERN

__all__ = [
    "NAV",
    "Ctx",
    "Form",
    "Posted",
    "SignedIn",
    "StaleForm",
    "host_json",
    "signin_redirect",
    "stale_form",
    "vm_path",
]

NAV = (
    ("vms", "Virtual machines"),
    ("hosts", "Hosts"),
    ("policy", "Policy"),
    ("events", "Events"),
    ("charts", "Charts"),
)
_HOST_TIMEOUT_S = 3.0
VMS = "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines"


def vm_path(sub: str, rg: str, name: str) -> str:
    """The API path of a VM; each name is quoted (a '?' or '#' in a typed name stays inside its segment)."""
    q = [quote(part, safe="") for part in (sub, rg, name)]
    return VMS.format(sub=q[0], rg=q[1]) + f"/{q[2]}"


class Ctx:
    """One request's user, API client and subscription (``SignedIn``: a route's dependency)."""

    def __init__(self, request: Request, portal: Portal, user: User) -> None:
        self.request = request
        self.portal = portal
        self.user = user
        sub = request.query_params.get("sub", "") or user.default_subscription
        self.sub = sub if re.fullmatch(SUB_NAME_PATTERN, sub) else user.default_subscription

    def api(self) -> ApiClient:
        return ApiClient(self.request.app, self.user.token, self.portal.missing_routes)

    def may(self, action: Action) -> bool:
        return self.user.may(action)

    def page(self, template: str, title: str, section: str, *, status: int = 200, **context: Any) -> HTMLResponse:
        return render(
            template,
            status=status,
            title=title,
            section=section,
            nav=NAV,
            user=self.user,
            sub=self.sub,
            may_write_vm=self.may(Action.WRITE_VM),
            may_migrate=self.may(Action.MIGRATE),
            may_write_policy=self.may(Action.WRITE_POLICY),
            **context,
        )

    def fragment(self, template: str, **context: Any) -> HTMLResponse:
        return render(
            template,
            user=self.user,
            sub=self.sub,
            may_write_vm=self.may(Action.WRITE_VM),
            may_migrate=self.may(Action.MIGRATE),
            may_write_policy=self.may(Action.WRITE_POLICY),
            **context,
        )


class StaleForm(Exception):
    """A state-changing request without this session's CSRF token: refused before anything is done."""


def _signed_in(request: Request) -> Ctx:
    portal: Portal = request.app.state.portal
    return Ctx(request, portal, portal.user(request))  # NotSignedIn: the app answers with the sign-in


async def _posted(request: Request, ctx: Annotated[Ctx, Depends(_signed_in)]) -> Posted:
    form = await read_form(request)
    if not ctx.portal.check_csrf(request, ctx.user, form.get("csrf")):
        raise StaleForm()
    return Posted(ctx, form)


@dataclass(frozen=True, slots=True)
class Posted:
    ctx: Ctx
    form: dict[str, str]


SignedIn = Annotated[Ctx, Depends(_signed_in)]
Form = Annotated[Posted, Depends(_posted)]


def signin_redirect(request: Request, exc: NotSignedIn) -> Response:
    if request.headers.get("hx-request"):
        # An htmx fragment asking after the session ended: send the whole page to the sign-in.
        return Response(status_code=204, headers={"HX-Redirect": exc.location})
    return RedirectResponse(exc.location, status_code=303)


def stale_form() -> Response:
    return render(
        "signin.html",
        status=403,
        title="Form expired",
        next="/portal/vms",
        error="That form has expired or did not come from this portal. Sign in again and retry.",
    )


async def host_json(client: httpx.AsyncClient, base: str, path: str) -> dict[str, Any] | None:
    """A host daemon's JSON answer, or ``None`` when it does not answer in time (the page says so)."""
    try:
        response = await asyncio.wait_for(client.get(base.rstrip("/") + path), _HOST_TIMEOUT_S)
    except (httpx.HTTPError, TimeoutError, httpx.InvalidURL):
        return None
    if response.status_code != 200:
        return None
    try:
        data = response.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
