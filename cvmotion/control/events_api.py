"""control layer: the API of fleet event delivery — events (JSON or Server-Sent Events), webhooks, ``/metrics``.

``GET /v1/events`` (and its older path ``/providers/Cvmotion.Fabric/events``): the newest ``limit`` events,
or those after a cursor (``?after=`` or ``Last-Event-ID``); ``follow=true`` then streams every new one as a
Server-Sent Event ``id: <event id>`` / ``data: <CloudEvent JSON>``, so an ``EventSource`` that reconnects
resumes exactly after the last event it received.  A stream ends after ``lifetime_s`` (the client
reconnects), sends a comment every ``keepalive_s`` of silence, and waits on this replica's outbox notifier
(``control.outbox``) with a bounded poll for other replicas' events: no thread is held while it waits.

Webhooks (``/v1/webhooks``): created and deleted by Contributors and Owners, read by every role that reads;
a token for one subscription sees and makes only that subscription's webhooks.  ``/metrics`` describes the
whole fleet, so it needs a token that reads every subscription (``*``).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from cvmotion.control import events_schema as schema
from cvmotion.control import webhooks
from cvmotion.control.api_schema import EventList, Limit, ServerSentEvent, json_request, refusals
from cvmotion.control.auth import ALL_SUBSCRIPTIONS, Action, Principal, authorize
from cvmotion.control.db import DeliveryState, Event
from cvmotion.control.errors import Forbidden
from cvmotion.control.events import EventFilter, cloud_event, latest_events, read_after
from cvmotion.control.metrics import render_metrics
from cvmotion.control.outbox import notifier
from cvmotion.control.service import FleetController
from cvmotion.ipc.openapi import inline_schema

__all__ = ["StreamOptions", "install_fleet_events"]

_BATCH = 500
_bearer = HTTPBearer(auto_error=False, scheme_name="BearerToken", description="cvmotion controller token create")


@dataclass(frozen=True, slots=True)
class StreamOptions:
    lifetime_s: float = 3600.0  # a stream ends after this; the client resumes with Last-Event-ID
    keepalive_s: float = 15.0  # a comment line after this much silence (proxies close idle connections)
    poll_s: float = 1.0  # how often a waiting stream looks for other replicas' events
    retry_ms: int = 2000  # the reconnection delay an EventSource is told


def _principal(request: Request, _: Annotated[Any, Depends(_bearer)] = None) -> Principal:
    from cvmotion.control.api import _caller  # api installs these routes, so it is loaded by any request

    return _caller(request)


async def _body(request: Request) -> Any:
    from cvmotion.control.api import _json_body

    return await _json_body(request)


def _parse_webhook(body: Any) -> schema.WebhookBody:
    from cvmotion.control.api import _parse

    parsed: schema.WebhookBody = _parse(schema.WebhookBody, body, "webhook")
    return parsed


Caller = Annotated[Principal, Depends(_principal)]
JsonBody = Annotated[Any, Depends(_body)]


def _may_manage_webhooks(principal: Principal) -> None:
    try:
        authorize(principal, Action.WRITE_VM)  # the roles that change a subscription's resources
    except Forbidden:
        raise Forbidden(f"role {principal.role.value} may not manage webhooks (Contributor or Owner may)") from None


def _sse(event: dict[str, Any]) -> str:
    return f"id: {event['id']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"


def _stream(ctl: FleetController, options: StreamOptions, where: EventFilter, start: int) -> AsyncIterator[str]:
    wake = notifier(ctl.engine.url)

    def read(cursor: int) -> tuple[list[dict[str, Any]], int]:
        def run(s: Session) -> tuple[list[dict[str, Any]], int]:
            rows, after = read_after(s, cursor, where, _BATCH)
            return [cloud_event(r) for r in rows], after

        return ctl.transaction(run, write=False)

    async def gen() -> AsyncIterator[str]:
        cursor = start
        yield f"retry: {options.retry_ms}\n\n"
        deadline = time.monotonic() + options.lifetime_s
        quiet_since = time.monotonic()
        while True:
            seen = wake.generation
            batch, cursor = await run_in_threadpool(read, cursor)
            for event in batch:
                yield _sse(event)
            now = time.monotonic()
            if batch:
                quiet_since = now
                if len(batch) == _BATCH:
                    continue
            elif now - quiet_since >= options.keepalive_s:
                yield ": keep-alive\n\n"
                quiet_since = now
            if now >= deadline:
                return
            pause = min(options.poll_s, deadline - now, options.keepalive_s - (now - quiet_since))
            await wake.wait_async(seen, max(pause, 0.0))

    return gen()


def _event_routes(router: APIRouter, ctl: FleetController) -> None:
    stream_doc = {
        200: {
            "model": EventList,
            "description": "the events (CloudEvents), or with follow=true a text/event-stream (bounded; resume"
            " with Last-Event-ID)",
            "content": {"text/event-stream": {"schema": inline_schema(ServerSentEvent)}},
        },
        **refusals(),
    }

    def events(
        request: Request,
        principal: Caller,
        limit: Limit = 100,
        follow: schema.Follow = False,
        after: schema.After = None,
        types: schema.Types = None,
        subject: schema.Subject = None,
        last_event_id: schema.LastEventId = "",
    ) -> Any:
        authorize(principal, Action.READ)
        where = EventFilter(types=tuple(types or ()), subject=subject or "", scope=principal.subscription)
        cursor = int(last_event_id) if last_event_id else after

        def first(s: Session) -> tuple[list[Event], int]:
            return latest_events(s, where, limit) if cursor is None else read_after(s, cursor, where, limit)

        rows, position = ctl.transaction(first, write=False)
        if not follow:
            return {"value": [cloud_event(r) for r in rows]}
        options: StreamOptions = getattr(request.app.state, "event_stream", None) or StreamOptions()
        head = [_sse(cloud_event(r)) for r in rows]
        # After a page of `limit` following a cursor, the stream continues from the last one sent.
        start = rows[-1].id if cursor is not None and len(rows) == limit else position

        async def body() -> AsyncIterator[str]:
            tail = _stream(ctl, options, where, start)
            yield await tail.__anext__()  # retry:
            for line in head:
                yield line
            async for line in tail:
                yield line

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(body(), media_type="text/event-stream", headers=headers)

    summary = "events (CloudEvents 1.0): the newest, or after a cursor; follow=true: then every new one (SSE)"
    for path, op_id in (("/v1/events", "stream_events"), ("/providers/Cvmotion.Fabric/events", "events")):
        router.add_api_route(
            path, events, methods=["GET"], operation_id=op_id, summary=summary, response_model=None,
            responses=stream_doc, description=schema.STREAM_DESCRIPTION,
        )  # fmt: skip


def _webhook_routes(router: APIRouter, ctl: FleetController) -> None:
    @router.post(
        "/v1/webhooks",
        operation_id="create_webhook",
        summary="subscribe a URL to events (Contributor or Owner); the answer shows the signing secret once",
        status_code=201,
        response_model=None,
        responses={201: {"model": schema.WebhookCreated, "description": "created"}, **refusals(body=True)},
        openapi_extra=json_request(schema.WebhookBody, schema.WEBHOOK_EXAMPLE),
    )
    def create(principal: Caller, body: JsonBody) -> Any:
        parsed = _parse_webhook(body)

        def run(s: Session) -> dict[str, Any]:
            _may_manage_webhooks(principal)
            hook, secret = webhooks.create_webhook(s, principal, parsed, time.time())
            return webhooks.webhook_view(hook) | {"secret": secret}

        return JSONResponse(ctl.transaction(run), status_code=201)

    @router.get(
        "/v1/webhooks",
        operation_id="list_webhooks",
        summary="the webhooks this token's subscription may see, with their deliveries by state",
        responses={200: {"model": schema.WebhookList, "description": "the webhooks"}, **refusals()},
    )
    def list_all(principal: Caller) -> Any:
        def run(s: Session) -> dict[str, Any]:
            authorize(principal, Action.READ)
            hooks = webhooks.list_webhooks(s, principal)
            counts = webhooks.delivery_counts(s, [h.id for h in hooks])
            return {"value": [webhooks.webhook_view(h, counts[h.id]) for h in hooks]}

        return ctl.transaction(run, write=False)

    @router.get(
        "/v1/webhooks/{hook_id}",
        operation_id="get_webhook",
        summary="a webhook and its deliveries by state",
        responses={200: {"model": schema.WebhookView, "description": "the webhook"}, **refusals(404)},
    )
    def show(hook_id: schema.WebhookId, principal: Caller) -> Any:
        def run(s: Session) -> dict[str, Any]:
            authorize(principal, Action.READ)
            hook = webhooks.visible_webhook(s, principal, hook_id)
            return webhooks.webhook_view(hook, webhooks.delivery_counts(s, [hook.id])[hook.id])

        return ctl.transaction(run, write=False)

    @router.delete(
        "/v1/webhooks/{hook_id}",
        operation_id="delete_webhook",
        summary="stop delivering to a webhook and forget its deliveries (Contributor or Owner)",
        responses={200: {"model": schema.WebhookDeleted, "description": "deleted"}, **refusals(404)},
    )
    def remove(hook_id: schema.WebhookId, principal: Caller) -> Any:
        def run(s: Session) -> dict[str, Any]:
            _may_manage_webhooks(principal)
            webhooks.delete_webhook(s, webhooks.visible_webhook(s, principal, hook_id))
            return {"deleted": hook_id}

        return ctl.transaction(run)

    @router.get(
        "/v1/webhooks/{hook_id}/deliveries",
        operation_id="list_webhook_deliveries",
        summary="a webhook's deliveries, newest first (state=DeadLettered: what never arrived)",
        responses={200: {"model": schema.DeliveryList, "description": "the deliveries"}, **refusals(404)},
    )
    def deliveries(
        hook_id: schema.WebhookId, principal: Caller, state: schema.DeliveryStateQuery = None, limit: Limit = 100
    ) -> Any:
        def run(s: Session) -> dict[str, Any]:
            authorize(principal, Action.READ)
            hook = webhooks.visible_webhook(s, principal, hook_id)
            rows = webhooks.list_deliveries(s, hook, DeliveryState(state) if state else None, limit)
            return {"value": [webhooks.delivery_view(d) for d in rows]}

        return ctl.transaction(run, write=False)

    @router.post(
        "/v1/webhooks/{hook_id}/deliveries/{delivery_id}/redeliver",
        operation_id="redeliver_webhook_delivery",
        summary="try a dead-lettered delivery again, with its attempts counted afresh (Contributor or Owner)",
        responses={200: {"model": schema.DeliveryView, "description": "the delivery"}, **refusals(404)},
    )
    def again(hook_id: schema.WebhookId, delivery_id: schema.DeliveryId, principal: Caller) -> Any:
        def run(s: Session) -> dict[str, Any]:
            _may_manage_webhooks(principal)
            hook = webhooks.visible_webhook(s, principal, hook_id)
            return webhooks.delivery_view(webhooks.redeliver(s, hook, delivery_id, time.time()))

        out = ctl.transaction(run)
        ctl.webhooks.wake()
        return out


def _metrics_route(router: APIRouter, ctl: FleetController) -> None:
    @router.get(
        "/metrics",
        operation_id="metrics",
        summary="Prometheus metrics of the fleet (a token that reads every subscription)",
        response_class=Response,
        responses={200: {"description": "the text exposition format", "content": schema.METRICS_CONTENT},
                   **refusals()},
    )  # fmt: skip
    def metrics(principal: Caller) -> Response:
        authorize(principal, Action.READ)
        if principal.subscription != ALL_SUBSCRIPTIONS:
            raise Forbidden("/metrics describes the whole fleet: it needs a token for every subscription ('*')")
        read: Callable[[Any], Any] = lambda collect: ctl.transaction(collect, write=False)  # noqa: E731
        return Response(render_metrics(read), media_type="text/plain; version=0.0.4; charset=utf-8")


def install_fleet_events(app: FastAPI, ctl: FleetController) -> None:
    """Add the routes of event delivery to the controller's app (its own router: plain routes, documented)."""
    _event_routes(app.router, ctl)
    _webhook_routes(app.router, ctl)
    _metrics_route(app.router, ctl)
