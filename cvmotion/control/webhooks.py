"""control layer: webhook subscriptions and their deliveries in the database — fan-out, claims, outcomes.

A webhook (``Webhook`` row) names a URL, type patterns, a subject prefix and the subscription whose events
it may receive (``control.events`` visibility).  Its ``cursor`` follows the events table: the fan-out turns
each new matching event into one ``WebhookDelivery`` (unique per webhook and event), then moves the cursor,
in one transaction — so an event is fanned out once, even by two replicas (the webhook row is locked, ``SKIP
LOCKED`` on PostgreSQL), and none is skipped (ids appear in commit order).

A delivery's life::

    Pending ──claim (lease)──▶ POST ──2xx──▶ Succeeded
       ▲                         │
       └── next_attempt_at ◀─────┤ any other answer, or none, with attempts left
           (backoff + jitter)    └── attempts exhausted ──▶ DeadLettered ──redeliver──▶ Pending

A claim is a lease (``claimed_by``, ``lease_until``), as the operation worker's: a replica that dies
mid-delivery leaves it to be claimed again when the lease runs out, so delivery is at least once, and a
receiver deduplicates by ``webhook-id`` (the event id).  At most one delivery per webhook is in flight per
claim, so a slow endpoint holds one delivery thread, not all of them.
"""

from __future__ import annotations

import json
import random
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, exists, func, or_, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, aliased

from cvmotion.control.auth import ALL_SUBSCRIPTIONS, Principal
from cvmotion.control.db import DeliveryState, Event, Webhook, WebhookDelivery
from cvmotion.control.errors import Forbidden
from cvmotion.control.events import EventFilter, cloud_event, newest_id, read_after
from cvmotion.control.events_schema import WebhookBody
from cvmotion.control.webhook_signing import generate_secret
from cvmotion.errors import NotFound

__all__ = [
    "Attempt",
    "RetryPolicy",
    "claim_delivery",
    "create_webhook",
    "fan_out",
    "record_outcome",
    "webhook_view",
]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with "equal jitter": attempt n waits between half and all of base * 2**(n-1)."""

    base_s: float = 1.0
    cap_s: float = 3600.0

    def delay(self, attempts: int, rng: random.Random) -> float:
        full = min(self.cap_s, self.base_s * 2 ** max(attempts - 1, 0))
        return float(full / 2 + rng.uniform(0, full / 2))


@dataclass(frozen=True, slots=True)
class Attempt:
    """One claimed delivery: everything the POST needs, read in the claim's transaction."""

    delivery_id: int
    webhook_id: str
    url: str
    secret: str
    event_id: int
    body: bytes
    attempt: int


def create_webhook(session: Session, principal: Principal, body: WebhookBody, now: float) -> tuple[Webhook, str]:
    """A new webhook (and its secret), receiving events committed from now on."""
    scope = body.subscription or principal.subscription
    if principal.subscription not in (ALL_SUBSCRIPTIONS, scope):
        raise Forbidden(f"the token is for subscription {principal.subscription!r}, not {scope!r}")
    secret = body.secret or generate_secret()
    hook = Webhook(
        id="wh-" + secrets.token_hex(8),
        scope=scope,
        url=body.url,
        types=list(body.types),
        subject=body.subject_begins_with,
        secret=secret,
        max_attempts=body.max_delivery_attempts,
        cursor=newest_id(session),
        created_at=now,
    )
    session.add(hook)
    return hook, secret


def visible_webhook(session: Session, principal: Principal, hook_id: str) -> Webhook:
    hook = session.get(Webhook, hook_id)
    if hook is None or principal.subscription not in (ALL_SUBSCRIPTIONS, hook.scope):
        raise NotFound(f"webhook {hook_id} does not exist")
    return hook


def list_webhooks(session: Session, principal: Principal) -> list[Webhook]:
    query = select(Webhook).order_by(Webhook.created_at)
    if principal.subscription != ALL_SUBSCRIPTIONS:
        query = query.where(Webhook.scope == principal.subscription)
    return list(session.scalars(query))


def delete_webhook(session: Session, hook: Webhook) -> None:
    session.execute(delete(WebhookDelivery).where(WebhookDelivery.webhook == hook.id))
    session.delete(hook)


def delivery_counts(session: Session, hook_ids: list[str]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {h: {s.value: 0 for s in DeliveryState} for h in hook_ids}
    rows = session.execute(
        select(WebhookDelivery.webhook, WebhookDelivery.state, func.count())
        .where(WebhookDelivery.webhook.in_(hook_ids))
        .group_by(WebhookDelivery.webhook, WebhookDelivery.state)
    )
    for hook_id, state, count in rows:
        counts[hook_id][state.value] = count
    return counts


def webhook_view(hook: Webhook, counts: dict[str, int] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": hook.id,
        "url": hook.url,
        "types": hook.types,
        "subjectBeginsWith": hook.subject,
        "subscription": hook.scope,
        "maxDeliveryAttempts": hook.max_attempts,
        "createdAt": hook.created_at,
    }
    if counts is not None:
        out["deliveries"] = counts
    return out


def delivery_view(d: WebhookDelivery) -> dict[str, Any]:
    return {
        "id": d.id,
        "eventId": str(d.event_id),
        "state": d.state.value,
        "attempts": d.attempts,
        "nextAttemptAt": d.next_attempt_at,
        "lastStatus": d.last_status,
        "lastError": d.last_error,
        "updatedAt": d.updated_at,
    }


def list_deliveries(session: Session, hook: Webhook, state: DeliveryState | None, limit: int) -> list[WebhookDelivery]:
    query = select(WebhookDelivery).where(WebhookDelivery.webhook == hook.id)
    if state is not None:
        query = query.where(WebhookDelivery.state == state)
    return list(session.scalars(query.order_by(WebhookDelivery.id.desc()).limit(limit)))


def redeliver(session: Session, hook: Webhook, delivery_id: int, now: float) -> WebhookDelivery:
    """A dead-lettered delivery back to Pending, with its attempts counted afresh."""
    d = session.get(WebhookDelivery, delivery_id, with_for_update=True)
    if d is None or d.webhook != hook.id:
        raise NotFound(f"delivery {delivery_id} of webhook {hook.id} does not exist")
    if d.state is DeliveryState.DEAD_LETTERED:
        d.state, d.attempts, d.next_attempt_at, d.updated_at = DeliveryState.PENDING, 0, now, now
    return d


# -- the delivery threads' side -------------------------------------------------------------------------


def fan_out_due(session: Session) -> bool:
    """A cheap read: whether some webhook's cursor is behind the newest event."""
    ceiling = newest_id(session)
    return session.scalar(select(Webhook.id).where(Webhook.cursor < ceiling).limit(1)) is not None


def fan_out(session: Session, now: float, batch: int = 1000) -> int:
    """Deliveries for the events after each webhook's cursor (at most ``batch`` per webhook); how many."""
    ceiling = newest_id(session)
    hooks = session.scalars(select(Webhook).where(Webhook.cursor < ceiling).with_for_update(skip_locked=True))
    made = 0
    for hook in hooks:
        where = EventFilter(types=tuple(hook.types), subject=hook.subject, scope=hook.scope)
        rows, hook.cursor = read_after(session, hook.cursor, where, batch)
        for row in rows:
            session.add(
                WebhookDelivery(
                    webhook=hook.id, event_id=row.id, state=DeliveryState.PENDING, next_attempt_at=now, created_at=now
                )
            )
        made += len(rows)
    return made


def _claimable(now: float) -> list[Any]:
    busy = aliased(WebhookDelivery)
    in_flight = exists().where(
        busy.webhook == WebhookDelivery.webhook,
        busy.id != WebhookDelivery.id,
        busy.claimed_by.is_not(None),
        busy.lease_until >= now,
    )
    return [
        WebhookDelivery.state == DeliveryState.PENDING,
        WebhookDelivery.next_attempt_at <= now,
        or_(WebhookDelivery.claimed_by.is_(None), WebhookDelivery.lease_until < now),
        ~in_flight,
    ]


def next_due(session: Session, now: float) -> float | None:
    """When the earliest pending delivery is due (``now`` if one is claimable now); ``None``: none pending."""
    if session.scalar(select(WebhookDelivery.id).where(*_claimable(now)).limit(1)) is not None:
        return now
    due = session.scalar(
        select(func.min(WebhookDelivery.next_attempt_at)).where(WebhookDelivery.state == DeliveryState.PENDING)
    )
    return None if due is None else max(float(due), now)


def claim_delivery(session: Session, worker: str, now: float, lease: float) -> Attempt | None:
    """Claim the earliest due delivery of a webhook with none in flight.

    The webhook row is locked first (``SKIP LOCKED`` on PostgreSQL), so two replicas claiming at once
    take deliveries of different webhooks, never two of one; the webhook whose work is oldest goes first.
    """
    oldest = (
        select(func.min(WebhookDelivery.next_attempt_at))
        .where(WebhookDelivery.webhook == Webhook.id, *_claimable(now))
        .scalar_subquery()
    )
    hook = session.scalars(
        select(Webhook)
        .where(oldest.is_not(None))
        .order_by(oldest, Webhook.id)
        .limit(1)
        .with_for_update(skip_locked=True, of=Webhook)
    ).first()
    if hook is None:
        return None
    d = session.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.webhook == hook.id, *_claimable(now))
        .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
        .limit(1)
        .with_for_update(skip_locked=True, of=WebhookDelivery)
    ).first()
    if d is None:
        return None
    event = session.get(Event, d.event_id)
    if event is None:  # an event never goes away; a delivery without one is dropped rather than retried
        session.delete(d)
        return None
    d.claimed_by, d.lease_until, d.attempts, d.updated_at = worker, now + lease, d.attempts + 1, now
    body = json.dumps(cloud_event(event), separators=(",", ":")).encode()
    return Attempt(d.id, hook.id, hook.url, hook.secret, event.id, body, d.attempts)


def record_outcome(
    session: Session,
    attempt: Attempt,
    worker: str,
    now: float,
    status: int,
    error: str,
    backoff: Callable[[int], float],
) -> DeliveryState | None:
    """What an attempt came to; ``None`` if the claim was lost meanwhile (another replica owns it now)."""
    d = session.get(WebhookDelivery, attempt.delivery_id, with_for_update=True)
    if d is None or d.claimed_by != worker:
        return None
    hook = session.get(Webhook, d.webhook)
    d.claimed_by, d.last_status, d.last_error, d.updated_at = None, status, error[:500], now
    if 200 <= status < 300:
        d.state = DeliveryState.SUCCEEDED
    elif hook is None or d.attempts >= hook.max_attempts:
        d.state = DeliveryState.DEAD_LETTERED
    else:
        d.next_attempt_at = now + backoff(d.attempts)
    return d.state


def prune_deliveries(session: Session, now: float, keep_succeeded_s: float, keep_dead_s: float) -> int:
    """Forget delivered deliveries older than ``keep_succeeded_s`` and dead-lettered ones older than
    ``keep_dead_s`` (never a pending one); how many.  A webhook's cursor is on its row, so nothing is sent again."""
    d = WebhookDelivery
    delivered = (d.state == DeliveryState.SUCCEEDED) & (d.updated_at < now - keep_succeeded_s)
    dead = (d.state == DeliveryState.DEAD_LETTERED) & (d.updated_at < now - keep_dead_s)
    done = session.execute(delete(d).where(or_(delivered, dead)))
    return int(done.rowcount or 0)  # type: ignore[attr-defined]


def release_claims(engine: Engine) -> None:
    """Free every delivery claim: SQLite only, where the file lock proves no other controller holds one."""
    with Session(engine) as session, session.begin():
        session.execute(update(WebhookDelivery).where(WebhookDelivery.claimed_by.is_not(None)).values(claimed_by=None))
