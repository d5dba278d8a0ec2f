"""control layer (portal): host drains through the controller's maintenance API, with the user's token.

A controller without the maintenance API answers 404 on these routes; the portal then says that drains
are not available there (and still shows each VM's own moves), instead of pretending to drain.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from cvmotion.control.portal.apiclient import ApiClient, ApiError

__all__ = ["REASONS", "active_hosts", "cancel", "current", "start", "uncordon"]

REASONS = ("SecurityUpdate", "HardwareRefresh")
MAX_NOTICE_S = 7 * 86400  # the drain API's bound
_HOSTS = "/providers/Cvmotion.Fabric/hosts"
_DRAINS = "/providers/Cvmotion.Fabric/drains"
_ACTIVE = ("Accepted", "Running", "Canceling")


def _missing(exc: ApiError) -> ApiError:
    # The router's own 404 (no such route) ends in "Not Found"; a drain API's 404 names what is missing.
    if exc.status in (404, 405) and exc.message.endswith("Not Found"):
        return ApiError(501, "NotAvailable", "this controller does not serve host drains")
    return exc


async def _post(api: ApiClient, host: str, action: str, body: dict[str, Any]) -> dict[str, Any]:
    try:
        answer: dict[str, Any] = await api.call("POST", f"{_HOSTS}/{quote(host, safe='')}/{action}", body)
    except ApiError as exc:
        raise _missing(exc) from None
    return answer


async def start(api: ApiClient, host: str, reason: str, notice_s: float | None = None) -> dict[str, Any]:
    """Cordon ``host`` and walk its VMs down the ladder (the controller's drain; role Owner).

    ``notice_s``: each Scheduled Event's NotBefore from when it is scheduled (the guest may approve earlier);
    ``None``: the controller's default.
    """
    body: dict[str, Any] = {"reason": reason}
    if notice_s is not None:
        body["noticeSeconds"] = notice_s
    return await _post(api, host, "drain", body)


async def cancel(api: ApiClient, host: str) -> dict[str, Any]:
    """No new step starts; moves in flight finish or abort cleanly (the host stays cordoned)."""
    return await _post(api, host, "drain/cancel", {})


async def uncordon(api: ApiClient, host: str) -> dict[str, Any]:
    return await _post(api, host, "uncordon", {})


async def current(api: ApiClient, host: str) -> dict[str, Any] | None:
    """The host's latest drain as the API shows it, or ``None`` (none, or no drain API)."""
    try:
        answer = await api.get(f"{_HOSTS}/{quote(host, safe='')}/drain")
    except ApiError:
        return None
    return answer if isinstance(answer, dict) else None


async def active_hosts(api: ApiClient) -> set[str]:
    try:
        answer = await api.get(_DRAINS, active="true")
    except ApiError:
        return set()
    rows = answer.get("value", []) if isinstance(answer, dict) else []
    return {str(d.get("host")) for d in rows if isinstance(d, dict) and (d.get("active") or d.get("status") in _ACTIVE)}
