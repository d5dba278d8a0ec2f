"""control layer (portal): host drains through the controller's maintenance API, with the user's token.

A controller without the maintenance API answers 404 on these routes; the portal then says that drains
are not available there (and still shows each VM's own moves), instead of pretending to drain.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from cvmotion.control.portal.apiclient import ApiClient, ApiError

__all__ = ["REASONS", "active_hosts", "cancel", "current", "start"]

REASONS = ("SecurityUpdate", "HardwareRefresh")
_HOSTS = "/providers/Cvmotion.Fabric/hosts"
_DRAINS = "/providers/Cvmotion.Fabric/drains"
_ACTIVE = ("Accepted", "Running", "InProgress", "Cancelling", "Draining")


def _missing(exc: ApiError) -> ApiError:
    if exc.status in (404, 405) and exc.code in ("ResourceNotFound", "NotFound", "HttpError", ""):
        return ApiError(501, "NotAvailable", "this controller does not serve host drains")
    return exc


async def start(api: ApiClient, host: str, reason: str) -> dict[str, Any]:
    try:
        answer: dict[str, Any] = await api.call("POST", f"{_HOSTS}/{quote(host, safe='')}/drain", {"reason": reason})
    except ApiError as exc:
        raise _missing(exc) from None
    return answer


async def cancel(api: ApiClient, host: str) -> dict[str, Any]:
    try:
        answer: dict[str, Any] = await api.call("POST", f"{_HOSTS}/{quote(host, safe='')}/drain/cancel", {})
    except ApiError as exc:
        raise _missing(exc) from None
    return answer


async def current(api: ApiClient, host: str) -> dict[str, Any] | None:
    """The host's latest drain as the API shows it, or ``None`` (none, or no drain API)."""
    try:
        answer = await api.get(f"{_HOSTS}/{quote(host, safe='')}/drain")
    except ApiError:
        return None
    return answer if isinstance(answer, dict) else None


async def active_hosts(api: ApiClient) -> set[str]:
    try:
        answer = await api.get(_DRAINS)
    except ApiError:
        return set()
    rows = answer.get("value", []) if isinstance(answer, dict) else []
    return {str(d.get("host")) for d in rows if isinstance(d, dict) and d.get("status") in _ACTIVE}
