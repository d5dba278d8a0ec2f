"""control layer (portal): reading the fleet's events through the API, filtered by type and subject.

The event stream API (``/v1/events``: type patterns, subject prefix, a cursor) is used where the
controller serves it; otherwise the older ``/providers/Cvmotion.Fabric/events`` list, filtered here.
Either way the API decides which events the user's token may see.
"""

from __future__ import annotations

from typing import Any

from cvmotion.control.portal.apiclient import ApiClient, ApiError

__all__ = ["EVENT_TYPES", "event_id", "matches", "newest_id", "read_after", "read_events", "short_type"]

# The filters the timeline offers: label -> type patterns (both namings of the controller's own types).
EVENT_TYPES: dict[str, tuple[str, ...]] = {
    "all": (),
    "migrations": ("cvmotion.migration.", "Cvmotion.Fabric.VmMigrated", "Cvmotion.Fabric.OperationMigrating"),
    "attestation": ("cvmotion.vm.postMigrationAttestation",),
    "maintenance": ("cvmotion.maintenance.", "Cvmotion.Fabric.Drain", "Cvmotion.Fabric.HostCordon"),
    "vms": ("Cvmotion.Fabric.Vm", "Cvmotion.Fabric.Operation"),
    "hosts": ("Cvmotion.Fabric.Host",),
}
_LIMIT = 1000


def short_type(event_type: str) -> str:
    """``Cvmotion.Fabric.VmMigrated`` -> ``VmMigrated``; ``cvmotion.migration.completed`` unchanged."""
    return event_type.removeprefix("Cvmotion.Fabric.")


def matches(event: dict[str, Any], kind: str, subject: str) -> bool:
    patterns = EVENT_TYPES.get(kind, ())
    etype = str(event.get("type", ""))
    if patterns and not any(etype.startswith(p) for p in patterns):
        return False
    return not subject or str(event.get("subject", "")).lower().startswith(subject.lower())


async def _fetch(api: ApiClient, *, subject: str, limit: int, after: int | None) -> list[dict[str, Any]]:
    """Events (oldest first) from the stream API, or from the older list filtered here."""
    params: dict[str, Any] = {"limit": limit, "subject": subject or None, "after": after}
    try:
        answer = await api.get("/v1/events", **params)
    except ApiError as exc:
        if exc.status not in (404, 405):
            raise
        answer = await api.get("/providers/Cvmotion.Fabric/events", limit=_LIMIT)
    events = answer.get("value", []) if isinstance(answer, dict) else []
    return [
        e for e in events
        if isinstance(e, dict) and matches(e, "all", subject) and (after is None or event_id(e) > after)
    ]  # fmt: skip


def event_id(event: dict[str, Any]) -> int:
    text = str(event.get("id", ""))
    return int(text) if text.isdigit() else 0


async def read_events(
    api: ApiClient, *, kind: str = "all", subject: str = "", limit: int = 200
) -> list[dict[str, Any]]:
    """The newest ``limit`` events the user may see that match the filter, oldest first."""
    # A kind is filtered here: read further back so that up to ``limit`` of that kind can be found.
    wide = limit if kind == "all" else _LIMIT
    events = await _fetch(api, subject=subject, limit=wide, after=None)
    return [e for e in events if matches(e, kind, subject)][-limit:]


async def read_after(api: ApiClient, after: int, *, subject: str = "") -> tuple[list[dict[str, Any]], int]:
    """The events after the cursor ``after`` (unfiltered by kind) and the cursor after them."""
    events = await _fetch(api, subject=subject, limit=500, after=after)
    return events, max((event_id(e) for e in events), default=after)


async def newest_id(api: ApiClient, *, subject: str = "") -> int:
    """The cursor after the newest event the user may see (where a stream that shows nothing old starts)."""
    events = await _fetch(api, subject=subject, limit=1, after=None)
    return max((event_id(e) for e in events), default=0)
