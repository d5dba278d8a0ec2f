"""control layer (portal): who is signed in — the API token in a cookie, and the forms' CSRF token.

Signing in stores the user's own API token in an ``HttpOnly; SameSite=Strict`` cookie (``Secure`` when
served over HTTPS): scripts cannot read it and no other site's page can send it.  The token is checked
with the API's own ``authenticate`` (the role only decides which buttons to draw; the API decides what
is allowed).  Every state-changing form also carries a CSRF token, an HMAC of the cookie's token under a
per-process key, compared in constant time: a forged cross-site POST has the cookie but never the token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from fastapi import Request
from sqlalchemy.orm import Session

from cvmotion.control.auth import Action, Principal, Role, authenticate, authorize
from cvmotion.control.errors import Forbidden, Unauthorized
from cvmotion.control.service import FleetController

__all__ = ["COOKIE", "CSRF_FIELD", "NotSignedIn", "Portal", "User", "same_origin"]

COOKIE = "cvmotion_portal"
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
_MAX_TOKEN = 200


class NotSignedIn(Exception):
    """No usable session: the page answers with a redirect to the sign-in page."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.location = f"/portal/signin?next={quote(next_path, safe='/')}"


@dataclass(frozen=True, slots=True)
class User:
    token: str
    principal: Principal
    csrf: str

    @property
    def role(self) -> str:
        return self.principal.role.value

    def may(self, action: Action) -> bool:
        """Whether to draw a button: the API still decides (a Reader who forges the POST gets 403)."""
        try:
            authorize(self.principal, action)
        except Forbidden:
            return False
        return True

    @property
    def default_subscription(self) -> str:
        sub = self.principal.subscription
        return "default" if sub == "*" else sub


class Portal:
    """Per-app session state: the controller (to authenticate tokens) and the CSRF key."""

    def __init__(self, ctl: FleetController) -> None:
        self.ctl = ctl
        self._key = secrets.token_bytes(32)
        self.missing_routes: set[str] = set()  # optional API routes this controller does not serve
        # Settled migrations' statuses from their source hosts (they never change): (host URL, id) -> status.
        self.migration_stats: dict[tuple[str, str], dict[str, Any]] = {}

    def csrf_for(self, token: str) -> str:
        return hmac.new(self._key, token.encode(), hashlib.sha256).hexdigest()

    def principal(self, token: str) -> Principal:
        """The token's principal (``Unauthorized`` for an unknown or malformed one)."""
        if not token or len(token) > _MAX_TOKEN or not token.isprintable() or " " in token:
            raise Unauthorized("that is not an API token (cvmotion controller token create prints one)")

        def run(session: Session) -> Principal:
            return authenticate(session, f"Bearer {token}")

        return self.ctl.transaction(run, write=False)

    def user(self, request: Request) -> User:
        """The signed-in user, or ``NotSignedIn`` (bad or missing cookie)."""
        token = request.cookies.get(COOKIE, "")
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if not token:
            raise NotSignedIn(target)
        try:
            principal = self.principal(token)
        except Unauthorized:
            raise NotSignedIn(target) from None
        if principal.role is Role.HOST:
            raise NotSignedIn(target)
        return User(token, principal, self.csrf_for(token))

    def check_csrf(self, request: Request, user: User, form_value: str | None) -> bool:
        given = form_value or request.headers.get(CSRF_HEADER, "")
        return same_origin(request) and hmac.compare_digest(given.encode(), user.csrf.encode())


def same_origin(request: Request) -> bool:
    """False when the browser says the form came from another site (``Origin``); no header: not a browser's
    cross-site POST (browsers send it on every cross-origin POST), so the other checks decide."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return origin in (f"http://{host}", f"https://{host}")
