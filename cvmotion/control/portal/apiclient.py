"""control layer (portal): the controller's own REST API, called in process with the signed-in user's token.

The portal never reads or writes the database for a user: every list, create, update and delete goes
through the API's routes (``httpx.ASGITransport`` on the same FastAPI app), so it passes exactly the
authentication, role checks, policy and validation an API client passes.  A refusal comes back as the
API's error envelope and is raised as ``ApiError`` with its ARM code and message, for the page to show.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.types import ASGIApp

__all__ = ["ApiClient", "ApiError"]

_TIMEOUT_S = 30.0


@dataclass
class ApiError(Exception):
    """An error answer of the API: its HTTP status, ARM code and message (and the envelope's extra keys)."""

    status: int
    code: str
    message: str
    extra: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ApiClient:
    """One user's view of the API: every call carries ``Authorization: Bearer <their token>``."""

    def __init__(self, app: ASGIApp, token: str, missing_routes: set[str] | None = None) -> None:
        # Paths this controller does not route (an optional API it was built without): asked once, then
        # answered here, so a page polling every second does not fill the log with refused requests.
        self._missing = missing_routes if missing_routes is not None else set()
        # raise_app_exceptions=False: Starlette re-raises an exception after its 500 answer was sent; the
        # portal wants the answer (the envelope), the log already has the exception.
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        self._client = httpx.AsyncClient(
            transport=transport,
            base_url="http://controller.portal",
            headers={"Authorization": f"Bearer {token}"},
            timeout=_TIMEOUT_S,
        )

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.aclose()

    async def call(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        """The decoded JSON answer; ``ApiError`` for any status >= 400."""
        if path in self._missing:
            raise ApiError(404, "NotFound", f"{method} {path}: Not Found")
        response = await self._client.request(
            method, path, json=body, params={k: v for k, v in params.items() if v is not None}
        )
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if response.status_code >= 400:
            error = payload.get("error") if isinstance(payload, dict) else None
            if not isinstance(error, dict):
                raise ApiError(response.status_code, "HttpError", response.text[:300] or response.reason_phrase)
            rest = {k: v for k, v in error.items() if k not in ("code", "message")}
            if response.status_code == 404 and str(error.get("message", "")).endswith(f"{path}: Not Found"):
                self._missing.add(path)
            raise ApiError(response.status_code, str(error.get("code", "")), str(error.get("message", "")), rest)
        return payload

    async def get(self, path: str, **params: Any) -> Any:
        return await self.call("GET", path, **params)
