"""control layer (portal): the portal's router — sign-in and sign-out, static assets, and each area's pages.

Every route is ``include_in_schema=False``: the portal's HTML pages are not part of the API's OpenAPI
contract.  ``portal_router(ctl)`` is included by ``control.api.create_app``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import RedirectResponse, Response

from cvmotion.control.errors import Unauthorized
from cvmotion.control.portal import views_events, views_hosts, views_policy, views_vms
from cvmotion.control.portal.common import StaleForm, signin_redirect, stale_form
from cvmotion.control.portal.forms import read_form
from cvmotion.control.portal.render import render
from cvmotion.control.portal.session import COOKIE, NotSignedIn, Portal, same_origin
from cvmotion.control.service import FleetController

__all__ = ["install_portal"]

_STATIC = Path(__file__).parent / "static"
# The only files served, with their types: no path from a request ever reaches the file system.
_ASSETS = {
    "htmx-2.0.11.min.js": "text/javascript",
    "htmx-ext-sse-2.2.4.min.js": "text/javascript",
    "portal.js": "text/javascript",
    "portal.css": "text/css",
}
_COOKIE_MAX_AGE_S = 8 * 3600


def _safe_next(value: str) -> str:
    # Only a path on this site: never "//evil.example" or "https://...", which would be an open redirect.
    if value.startswith("/portal/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/portal/vms"


def _router(portal: Portal) -> APIRouter:
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    def home() -> Response:
        return RedirectResponse("/portal/vms", status_code=303)

    @router.get("/portal", include_in_schema=False)
    @router.get("/portal/", include_in_schema=False)
    def portal_home() -> Response:
        return RedirectResponse("/portal/vms", status_code=303)

    @router.get("/portal/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        media = _ASSETS.get(name)
        if media is None:
            return Response("not found", status_code=404, media_type="text/plain")
        body = (_STATIC / name).read_bytes()
        # Versioned names (htmx-2.0.11...) may be cached for long; our own files for a minute.
        age = 86400 if name.startswith("htmx") else 60
        return Response(body, media_type=media, headers={"Cache-Control": f"public, max-age={age}"})

    @router.get("/portal/signin", include_in_schema=False)
    def signin_page(request: Request) -> Response:
        return render("signin.html", title="Sign in", next=_safe_next(request.query_params.get("next", "")), error=None)

    @router.post("/portal/signin", include_in_schema=False)
    async def signin(request: Request) -> Response:
        form = await read_form(request)
        token = form.get("token", "").strip()
        target = _safe_next(form.get("next", ""))
        error = None
        if not same_origin(request):
            # Another site's page posting a token would sign this browser in as someone else (login CSRF).
            error = "This sign-in did not come from this portal's page."
        elif not token:
            error = "Enter your API token."
        else:
            try:
                principal = portal.principal(token)
            except Unauthorized:
                error = (
                    "This token is not known to this controller."
                    " Check it, or create one with 'cvmotion controller token create'."
                )
            else:
                if principal.role.value == "Host":
                    error = "This is a host's registration token; sign in with a user's token."
        if error is not None:
            return render("signin.html", status=401, title="Sign in", next=target, error=error)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            COOKIE, token, max_age=_COOKIE_MAX_AGE_S, httponly=True, samesite="strict",
            secure=request.url.scheme == "https", path="/",
        )  # fmt: skip
        return response

    @router.post("/portal/signout", include_in_schema=False)
    def signout() -> Response:
        # No CSRF check needed: signing someone out is harmless, and the cookie is SameSite=Strict.
        response = RedirectResponse("/portal/signin", status_code=303)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response

    views_vms.register(router)
    views_hosts.register(router)
    views_policy.register(router)
    views_events.register(router)
    return router


def install_portal(app: FastAPI, ctl: FleetController) -> None:
    """Serve the portal from ``app`` (the controller's API app) at ``/`` and ``/portal/...``."""
    portal = Portal(ctl)
    app.state.portal = portal
    app.include_router(_router(portal))

    @app.exception_handler(NotSignedIn)
    async def _not_signed_in(request: Request, exc: NotSignedIn) -> Response:
        return signin_redirect(request, exc)

    @app.exception_handler(StaleForm)
    async def _stale(_: Request, exc: StaleForm) -> Response:
        return stale_form()
