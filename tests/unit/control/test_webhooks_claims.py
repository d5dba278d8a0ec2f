"""The webhook deliveries' database side on an injected clock: fan-out once per event and webhook, the
backoff schedule, dead-letter after the last attempt, one delivery in flight per webhook, and fencing (a
worker whose lease ran out cannot record over its successor)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from cvmotion.control import webhooks
from cvmotion.control.auth import Principal, Role
from cvmotion.control.db import DeliveryState, Event, WebhookDelivery, open_database
from cvmotion.control.events_schema import WebhookBody
from cvmotion.control.webhooks import RetryPolicy

LEASE = 30.0
POLICY = RetryPolicy(base_s=10.0, cap_s=40.0)
OWNER = Principal(Role.OWNER, "*")


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = open_database(f"sqlite:///{tmp_path / 'c.db'}")
    yield engine
    engine.dispose()


def txn(engine: Engine, body: Any) -> Any:
    with Session(engine, expire_on_commit=False) as session, session.begin():
        return body(session)


def add_events(engine: Engine, *types: str, sub: str = "default") -> None:
    subject = f"/subscriptions/{sub}/resourcegroups/rg/providers/microsoft.compute/virtualmachines/v"
    txn(engine, lambda s: s.add_all(Event(type=t, subject=subject, data={}) for t in types))


def hook(engine: Engine, **fields: Any) -> str:
    body = WebhookBody.model_validate({"url": "http://127.0.0.1:9/h", **fields})
    made, _secret = txn(engine, lambda s: webhooks.create_webhook(s, OWNER, body, 0.0))
    return str(made.id)


def claim(engine: Engine, worker: str, now: float) -> webhooks.Attempt | None:
    result: webhooks.Attempt | None = txn(engine, lambda s: webhooks.claim_delivery(s, worker, now, LEASE))
    return result


def finish(engine: Engine, attempt: webhooks.Attempt, worker: str, now: float, status: int) -> Any:
    rng = random.Random(1)
    return txn(
        engine,
        lambda s: webhooks.record_outcome(s, attempt, worker, now, status, "", lambda n: POLICY.delay(n, rng)),
    )


def states(engine: Engine) -> list[tuple[int, DeliveryState, int]]:
    rows = txn(engine, lambda s: list(s.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id))))
    return [(d.event_id, d.state, d.attempts) for d in rows]


def test_fan_out_makes_one_delivery_per_matching_event_once(engine: Engine) -> None:
    add_events(engine, "cvmotion.migration.started")  # before the webhook: not delivered
    migrations = hook(engine, types=["cvmotion.migration.*"])
    everything = hook(engine)
    add_events(engine, "cvmotion.migration.completed", "VmCreated", "cvmotion.migration.failed")
    assert txn(engine, lambda s: webhooks.fan_out(s, 0.0)) == 2 + 3
    assert txn(engine, lambda s: webhooks.fan_out(s, 0.0)) == 0  # the cursors moved: nothing twice
    assert not txn(engine, webhooks.fan_out_due)
    rows = txn(engine, lambda s: list(s.scalars(select(WebhookDelivery))))
    assert sorted((d.webhook == migrations, d.event_id) for d in rows) == [
        (False, 2), (False, 3), (False, 4), (True, 2), (True, 4)
    ]  # fmt: skip
    assert everything


def test_backoff_then_dead_letter_on_the_clock(engine: Engine) -> None:
    hook(engine, maxDeliveryAttempts=3)
    add_events(engine, "cvmotion.migration.failed")
    txn(engine, lambda s: webhooks.fan_out(s, 100.0))
    now = 100.0
    for attempt in (1, 2):
        got = claim(engine, "w", now)
        assert got is not None
        assert got.attempt == attempt
        assert finish(engine, got, "w", now, 503) is DeliveryState.PENDING
        due = txn(engine, lambda s, at=now: webhooks.next_due(s, at))
        full = min(POLICY.cap_s, POLICY.base_s * 2 ** (attempt - 1))
        assert now + full / 2 <= due <= now + full  # exponential, jittered
        assert claim(engine, "w", due - 0.001) is None  # not before it is due
        now = due
    last = claim(engine, "w", now)
    assert last is not None
    assert finish(engine, last, "w", now, 0) is DeliveryState.DEAD_LETTERED
    assert states(engine) == [(1, DeliveryState.DEAD_LETTERED, 3)]
    assert txn(engine, lambda s: webhooks.next_due(s, now + 1e6)) is None  # nothing pending


def test_one_delivery_in_flight_per_webhook(engine: Engine) -> None:
    first, second = hook(engine), hook(engine)
    add_events(engine, "cvmotion.migration.started", "cvmotion.migration.completed")
    txn(engine, lambda s: webhooks.fan_out(s, 0.0))
    a = claim(engine, "w1", 0.0)
    b = claim(engine, "w2", 0.0)
    c = claim(engine, "w3", 0.0)
    assert a is not None
    assert b is not None
    assert c is None
    assert {a.webhook_id, b.webhook_id} == {first, second}
    assert finish(engine, a, "w1", 1.0, 204) is DeliveryState.SUCCEEDED
    d = claim(engine, "w3", 1.0)
    assert d is not None
    assert d.webhook_id == a.webhook_id
    assert d.event_id == 2


def test_a_worker_that_lost_its_lease_cannot_record(engine: Engine) -> None:
    hook(engine)
    add_events(engine, "cvmotion.migration.started")
    txn(engine, lambda s: webhooks.fan_out(s, 0.0))
    stale = claim(engine, "slow", 0.0)
    assert stale is not None
    assert claim(engine, "other", LEASE - 1) is None
    fresh = claim(engine, "other", LEASE + 1)  # the lease ran out: claimed again (at least once)
    assert fresh is not None
    assert fresh.attempt == 2
    assert fresh.event_id == stale.event_id
    assert finish(engine, stale, "slow", LEASE + 2, 204) is None  # fenced
    assert finish(engine, fresh, "other", LEASE + 2, 204) is DeliveryState.SUCCEEDED
    assert states(engine) == [(1, DeliveryState.SUCCEEDED, 2)]


def test_release_claims_frees_a_dead_controllers_claims(engine: Engine) -> None:
    hook(engine)
    add_events(engine, "cvmotion.migration.started")
    txn(engine, lambda s: webhooks.fan_out(s, 0.0))
    assert claim(engine, "killed", 0.0) is not None
    assert claim(engine, "restarted", 1.0) is None
    webhooks.release_claims(engine)
    again = claim(engine, "restarted", 1.0)
    assert again is not None
    assert again.attempt == 2


def test_old_deliveries_are_forgotten_never_a_pending_one(engine: Engine) -> None:
    hook(engine, maxDeliveryAttempts=1)
    add_events(engine, "cvmotion.migration.started", "cvmotion.migration.failed", "cvmotion.migration.completed")
    txn(engine, lambda s: webhooks.fan_out(s, 0.0))
    delivered = claim(engine, "w", 10.0)
    assert delivered is not None
    finish(engine, delivered, "w", 10.0, 204)
    dead = claim(engine, "w", 20.0)
    assert dead is not None
    finish(engine, dead, "w", 20.0, 500)  # the one attempt: dead-lettered

    def prune(now: float) -> int:
        return int(txn(engine, lambda s: webhooks.prune_deliveries(s, now, 100.0, 1000.0)))

    assert prune(109.0) == 0
    assert prune(111.0) == 1  # the delivered one, a hundred seconds on
    assert prune(1019.0) == 0
    assert prune(1021.0) == 1  # the dead-lettered one, a thousand seconds on
    assert states(engine) == [(3, DeliveryState.PENDING, 0)]
    assert prune(1e9) == 0  # a pending delivery stays, however old


def test_a_dispatcher_prunes_on_its_schedule(engine: Engine) -> None:
    from cvmotion.control.webhook_delivery import DeliveryOptions, WebhookDispatcher

    now = [1000.0]
    options = DeliveryOptions(keep_succeeded_s=10.0, keep_dead_s=10.0, prune_every_s=60.0)
    dispatcher = WebhookDispatcher(engine, engine, "r", options=options, clock=lambda: now[0])
    hook(engine)
    add_events(engine, "cvmotion.migration.started", "cvmotion.migration.completed")
    txn(engine, lambda s: webhooks.fan_out(s, 0.0))
    for worker in ("a", "b"):  # one per webhook at a time: the second after the first is recorded
        got = claim(engine, worker, 0.0)
        assert got is not None
        finish(engine, got, worker, 0.0, 204)
    assert dispatcher.prune() == 2
    add_events(engine, "cvmotion.migration.failed")
    txn(engine, lambda s: webhooks.fan_out(s, 0.0))
    got = claim(engine, "c", 0.0)
    assert got is not None
    finish(engine, got, "c", 0.0, 204)
    now[0] += 59.0
    assert dispatcher.prune() == 0  # not yet its time
    now[0] += 2.0
    assert dispatcher.prune() == 1
