"""control layer (portal): the Events timeline (live, Server-Sent Events) and the Charts page.

The stream the browser follows is the portal's own (``/portal/events/stream``): the browser's
EventSource cannot send a bearer header, so the portal reads the API with the user's token from the
cookie and sends each new event as a rendered list item (``id:`` is the event id, so a reconnecting
browser resumes after the last one it got).  A stream ends after ten minutes; the browser reconnects.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from cvmotion.control.portal.apiclient import ApiError
from cvmotion.control.portal.charts import histogram_svg, summarise
from cvmotion.control.portal.common import SignedIn
from cvmotion.control.portal.eventsource import (
    EVENT_TYPES,
    event_id,
    matches,
    newest_id,
    read_after,
    read_events,
    short_type,
)
from cvmotion.control.portal.render import render_fragment

__all__ = ["register"]

_POLL_S = 0.5
_STREAM_S = 600.0


def _filters(request: Request) -> tuple[str, str]:
    kind = request.query_params.get("kind", "all")
    subject = request.query_params.get("subject", "")[:400]
    return (kind if kind in EVENT_TYPES else "all"), subject


def _number(data: dict[str, Any], *keys: str) -> float | None:
    for key in keys:
        value = data.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def series(events: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Downtime and total time of completed live migrations, and fallback pauses, in milliseconds.

    A move the drain ladder drives is reported twice: the worker's ``VmMigrated`` (followed, in the same
    transaction, by ``OperationSucceeded`` naming the operation) and the ladder's
    ``cvmotion.migration.completed`` (naming it too).  Each operation is counted once, the ladder's figures
    first (the worker has none when it found the VM already arrived).
    """
    moves: dict[str, dict[str, Any]] = {}
    ladder: set[str] = set()
    pending: dict[str, dict[str, Any]] = {}  # subject -> the VmMigrated data waiting for its operation id
    out: dict[str, list[float]] = {"downtime": [], "total": [], "pause": []}
    for event in events:
        etype, data = str(event.get("type", "")), event.get("data") or {}
        subject = str(event.get("subject", "")).lower()
        if etype.endswith("VmMigrated"):
            pending[subject] = data
            moves[f"event-{event.get('id')}"] = data
        elif etype.endswith("OperationSucceeded") and subject in pending:
            moved = pending.pop(subject)
            moves = {k: v for k, v in moves.items() if v is not moved}
            op = str(data.get("operation"))
            if op not in ladder:
                moves[op] = moved
        elif etype == "cvmotion.migration.completed":
            op = str(data.get("operation") or f"event-{event.get('id')}")
            moves[op] = data
            ladder.add(op)
        elif etype == "cvmotion.maintenance.fallback":
            pause = _number(data, "pauseMs", "pause")
            if pause is not None:
                out["pause"].append(pause)
    for data in moves.values():
        downtime = _number(data, "downtimeMs", "downtime")
        total = _number(data, "totalMs", "totalTimeMs", "total-time")
        if downtime is not None:
            out["downtime"].append(downtime)
        if total is not None:
            out["total"].append(total)
    return out


def register(router: APIRouter) -> None:
    @router.get("/portal/events", include_in_schema=False)
    async def events(ctx: SignedIn) -> Response:
        request = ctx.request
        kind, subject = _filters(request)
        async with ctx.api() as api:
            try:
                rows, error = await read_events(api, kind=kind, subject=subject, limit=100), None
            except ApiError as exc:
                rows, error = [], str(exc)
        return ctx.page(
            "events.html", "Events", "events", rows=rows[::-1], error=error, kind=kind, subject=subject,
            kinds=list(EVENT_TYPES), short_type=short_type, after=max((event_id(e) for e in rows), default=0),
        )  # fmt: skip

    @router.get("/portal/events/stream", include_in_schema=False)
    async def stream(ctx: SignedIn) -> Response:
        request = ctx.request
        kind, subject = _filters(request)
        # Resume after the last event this browser got, else after the newest the page was rendered with.
        resume = request.headers.get("last-event-id", "") or request.query_params.get("after", "")
        since = int(resume) if resume.isdigit() and len(resume) < 19 else None

        async def lines() -> AsyncIterator[str]:
            deadline = time.monotonic() + _STREAM_S
            async with ctx.api() as api:
                try:
                    # The page already shows the newest events: a fresh stream starts after them.
                    last = since if since is not None else await newest_id(api, subject=subject)
                    while time.monotonic() < deadline and not await request.is_disconnected():
                        batch, last = await read_after(api, last, subject=subject)
                        shown = [e for e in batch if matches(e, kind, subject)]
                        for event in shown:
                            item = render_fragment("_event.html", e=event, short_type=short_type)
                            data = "".join(f"data: {line}\n" for line in item.splitlines() if line.strip())
                            yield f"id: {event['id']}\nevent: message\n{data}\n"
                        if not shown:
                            yield ": keep-alive\n\n"
                        await asyncio.sleep(_POLL_S)
                except ApiError:
                    return  # the token no longer reads events: end; the page keeps what it shows

        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(lines(), media_type="text/event-stream", headers=headers)

    @router.get("/portal/charts", include_in_schema=False)
    async def charts(ctx: SignedIn) -> Response:
        async with ctx.api() as api:
            try:
                rows, error = await read_events(api, limit=1000), None
            except ApiError as exc:
                rows, error = [], str(exc)
        data = series(rows)
        charts = [
            ("Downtime of recent live migrations", "downtime", "ms"),
            ("Total time of recent live migrations", "total", "ms"),
            ("Pauses of in-place fallbacks (memory-preserving updates)", "pause", "ms"),
        ]
        drawn = [
            {"title": t, "svg": histogram_svg(data[key], title=t, unit=unit), "summary": summarise(data[key])}
            for t, key, unit in charts
        ]
        return ctx.page("charts.html", "Charts", "charts", charts=drawn, error=error)
