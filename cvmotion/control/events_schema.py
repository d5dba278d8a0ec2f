"""control layer: the OpenAPI shapes of fleet event delivery — event queries, webhooks, deliveries.

The request body of ``POST /v1/webhooks`` (``WebhookBody``: unknown keys refused) and the answers of the
event, webhook and metrics routes (``control.events_api``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Header, Path, Query
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from cvmotion.control.events import TYPE_PATTERN
from cvmotion.control.resources import SUB_NAME_PATTERN
from cvmotion.control.webhook_signing import SECRET_PATTERN

__all__ = [
    "DeliveryList",
    "DeliveryView",
    "WebhookBody",
    "WebhookCreated",
    "WebhookList",
    "WebhookView",
]

DEFAULT_MAX_ATTEMPTS = 15
WEBHOOK_ID_PATTERN = r"^wh-[0-9a-f]{16}$"
MAX_CURSOR = (1 << 63) - 1
# http(s)://host[:port][/path]: ASCII host names and IPv4 literals, ports up to 65535.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_PORT = r"(?:[0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
URL_PATTERN = rf"^https?://{_LABEL}(?:\.{_LABEL})*(?::{_PORT})?(?:/[!-~]*)?$"

TypePattern = Annotated[str, StringConstraints(pattern=TYPE_PATTERN, max_length=64)]

# -- query parameters of the event routes ------------------------------------------------------------------

Types = Annotated[
    list[TypePattern] | None,
    Query(
        alias="type",
        max_length=20,
        description="only these types (repeat it); a prefix ends in '.*', e.g. cvmotion.migration.*",
        examples=[["cvmotion.migration.completed"]],
    ),
]
Subject = Annotated[
    str | None, Query(max_length=400, description="only subjects that begin with this (case-insensitive)")
]
After = Annotated[
    int | None, Query(ge=0, le=MAX_CURSOR, description="only events after this id (what Last-Event-ID says)")
]
# Left out of the document (``STREAM_DESCRIPTION`` says it): Schemathesis takes an operation's configured
# Authorization for generated credentials once the operation declares any header parameter.
LastEventId = Annotated[str, Header(alias="Last-Event-ID", pattern=r"^[0-9]{0,18}$", include_in_schema=False)]
STREAM_DESCRIPTION = (
    "Without a cursor: the newest `limit` events the token may see; with `after` or a `Last-Event-ID` header"
    " (the id of the last event received, digits; an EventSource sends it when it reconnects): the events"
    " after it. `follow=true`: then every new one as Server-Sent Events (`id:` the event id, `data:` the"
    " CloudEvent), `: keep-alive` comments in silence; the stream ends after an hour (reconnect with"
    " Last-Event-ID: nothing is lost or repeated)."
)
Follow = Annotated[bool, Query(description="then stream every new event as Server-Sent Events")]
WebhookId = Annotated[str, Path(pattern=WEBHOOK_ID_PATTERN, examples=["wh-0123456789abcdef"])]
DeliveryId = Annotated[int, Path(ge=1, le=MAX_CURSOR)]
DeliveryStateQuery = Annotated[
    Literal["Pending", "Succeeded", "DeadLettered"] | None, Query(description="only deliveries in this state")
]


class WebhookBody(BaseModel):
    """``POST /v1/webhooks``: where to deliver, which events, how many tries."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    url: str = Field(pattern=URL_PATTERN, max_length=2048, description="the receiver; http or https")
    types: list[TypePattern] = Field(
        default_factory=list, max_length=20, description="event types or prefixes ending in '.*' (none: every type)"
    )
    subject_begins_with: str = Field("", alias="subjectBeginsWith", max_length=400)
    secret: str | None = Field(None, pattern=SECRET_PATTERN, description="whsec_ + base64 (omitted: generated)")
    max_delivery_attempts: int = Field(DEFAULT_MAX_ATTEMPTS, alias="maxDeliveryAttempts", ge=1, le=30)
    subscription: str | None = Field(
        None,
        pattern=rf"{SUB_NAME_PATTERN}|^\*$",
        description="whose events it receives (default: the token's subscription; '*' needs a token for all)",
    )


WEBHOOK_EXAMPLE = {"url": "https://siem.example/hooks/cvmotion", "types": ["cvmotion.migration.*"]}


class DeliveryCounts(BaseModel):
    Pending: int  # noqa: N815 - the states' names
    Succeeded: int  # noqa: N815
    DeadLettered: int  # noqa: N815


class WebhookView(BaseModel):
    id: str
    url: str
    types: list[str]
    subjectBeginsWith: str  # noqa: N815 - the API's spelling
    subscription: str
    maxDeliveryAttempts: int  # noqa: N815
    createdAt: float  # noqa: N815
    deliveries: DeliveryCounts | None = None


class WebhookCreated(WebhookView):
    secret: str = Field(description="whsec_...: shown once; the receiver verifies signatures with it")


class WebhookList(BaseModel):
    value: list[WebhookView]


class DeliveryView(BaseModel):
    id: int
    eventId: str  # noqa: N815
    state: Literal["Pending", "Succeeded", "DeadLettered"]
    attempts: int
    nextAttemptAt: float  # noqa: N815
    lastStatus: int  # noqa: N815
    lastError: str  # noqa: N815
    updatedAt: float  # noqa: N815


class DeliveryList(BaseModel):
    value: list[DeliveryView]


class WebhookDeleted(BaseModel):
    deleted: str


METRICS_CONTENT: dict[str, Any] = {
    "text/plain": {"schema": {"type": "string", "description": "Prometheus text exposition format 0.0.4"}}
}
