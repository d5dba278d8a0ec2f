"""Webhooks: Standard Webhooks signatures, the API (roles, scopes, bad input), and delivery to a real receiver
on loopback — signed CloudEvents, retry after the receiver was down, dead-letter and redelivery, a repeated
event recognisable by its id, and a stalled receiver that holds up no other webhook."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from control_harness import Api
from test_events_stream import serving

from cvmotion.control.auth import Role
from cvmotion.control.db import Event
from cvmotion.control.service import FleetController
from cvmotion.control.webhook_delivery import DeliveryOptions, WebhookDispatcher
from cvmotion.control.webhook_receiver import Received, WebhookReceiver
from cvmotion.control.webhook_signing import (
    WebhookVerificationError,
    generate_secret,
    sign,
    signature_headers,
    verify,
)
from cvmotion.control.webhooks import RetryPolicy
from cvmotion.testing.fakehost import FakeHost
from cvmotion.testing.hosts import free_port

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # 24 bytes, base64
VM = "/subscriptions/{sub}/resourcegroups/rg1/providers/microsoft.compute/virtualmachines/{name}"


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    """A controller whose delivery threads retry after 0.1-0.2 s (seeded jitter) and poll every 0.2 s."""
    ctl = FleetController(tmp_path / "ctl", workers=1)
    options = DeliveryOptions(threads=3, timeout_s=5.0, poll_s=0.2, retry=RetryPolicy(base_s=0.2, cap_s=0.4))
    ctl.webhooks = WebhookDispatcher(
        ctl.engine, ctl.reader, ctl.replica, options=options, write_lock=ctl.write_lock, rng=random.Random(7)
    )
    with serving(ctl) as a:
        yield a


def record(api: Api, type_: str, name: str, sub: str = "default", **data: Any) -> None:
    subject = VM.format(sub=sub, name=name)
    api.ctl.transaction(lambda s: s.add(Event(type=type_, subject=subject, data={"vm": name, **data})))


def create(api: Api, url: str, token: str | None = "owner", **fields: Any) -> Any:
    return api.req("POST", "/v1/webhooks", {"url": url, "secret": SECRET, **fields}, token=token)


def wait_until(check: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        time.sleep(0.05)


def deliveries(api: Api, hook: str, state: str | None = None) -> list[dict[str, Any]]:
    query = f"?state={state}" if state else ""
    out: list[dict[str, Any]] = api.req("GET", f"/v1/webhooks/{hook}/deliveries{query}").json()["value"]
    return out


# -- signatures ------------------------------------------------------------------------------------------


def test_signature_round_trip_and_every_refusal() -> None:
    body = b'{"specversion":"1.0","id":"42"}'
    headers = signature_headers(SECRET, "42", 1_700_000_000, body)
    assert headers["webhook-signature"].startswith("v1,")
    assert verify(SECRET, headers, body, now=1_700_000_100) == "42"
    upper = {k.upper(): v for k, v in headers.items()}  # header names are case-insensitive
    assert verify(SECRET, upper, body, now=1_700_000_000) == "42"
    rotated = headers | {"webhook-signature": f"v1,AAAA {headers['webhook-signature']}"}
    assert verify(SECRET, rotated, body, now=1_700_000_000) == "42"
    refusals = {
        "tampered body": (SECRET, headers, body.replace(b"42", b"43"), 1_700_000_000),
        "other secret": (generate_secret(), headers, body, 1_700_000_000),
        "replayed id": (SECRET, headers | {"webhook-id": "41"}, body, 1_700_000_000),
        "moved timestamp": (SECRET, headers | {"webhook-timestamp": "1700000001"}, body, 1_700_000_000),
        "too old": (SECRET, headers, body, 1_700_000_301),
        "from the future": (SECRET, headers, body, 1_699_999_699),
        "unsigned": (SECRET, {k: v for k, v in headers.items() if k != "webhook-signature"}, body, 1_700_000_000),
        "not a number": (SECRET, headers | {"webhook-timestamp": "soon"}, body, 1_700_000_000),
    }
    for case, (secret, hdrs, payload, now) in refusals.items():
        with pytest.raises(WebhookVerificationError):
            verify(secret, hdrs, payload, now=now)
        assert case
    # The signed content is id.timestamp.body, as Standard Webhooks defines it (a fixed vector).
    assert sign(SECRET, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}') == (
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    policy = RetryPolicy(base_s=1.0, cap_s=8.0)
    rng = random.Random(3)
    for attempts, full in ((1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0)):
        delays = [policy.delay(attempts, rng) for _ in range(50)]
        assert all(full / 2 <= d <= full for d in delays), (attempts, delays)
        assert max(delays) - min(delays) > full / 10  # jittered, not one value
    assert RetryPolicy().delay(1, random.Random(5)) == RetryPolicy().delay(1, random.Random(5))  # seeded


# -- the API ---------------------------------------------------------------------------------------------


def test_webhooks_api_roles_scopes_and_bad_input(api: Api) -> None:
    made = create(api, "http://127.0.0.1:9/hook", types=["cvmotion.migration.*"])
    assert made.status_code == 201, made.text
    hook = made.json()
    assert hook["secret"] == SECRET
    assert hook["subscription"] == "*"
    assert hook["maxDeliveryAttempts"] == 15
    generated = api.req("POST", "/v1/webhooks", {"url": "https://siem.example/in"}).json()["secret"]
    assert generated.startswith("whsec_")
    assert generated != SECRET
    listed = api.req("GET", "/v1/webhooks").json()["value"]
    assert [h["id"] for h in listed] == [hook["id"], listed[1]["id"]]
    assert "secret" not in listed[0]
    assert listed[0]["deliveries"] == {"Pending": 0, "Succeeded": 0, "DeadLettered": 0}

    reader, policy_admin = api.token(Role.READER), api.token(Role.POLICY_ADMINISTRATOR)
    for token in (reader, policy_admin):
        refused = create(api, "http://127.0.0.1:9/hook", token=token)
        assert refused.status_code == 403
        assert "Contributor or Owner" in refused.json()["error"]["message"]
    assert api.req("GET", "/v1/webhooks", token=reader).status_code == 200
    alpha = api.token(Role.CONTRIBUTOR, "alpha")
    assert create(api, "http://127.0.0.1:9/a", token=alpha).json()["subscription"] == "alpha"
    assert create(api, "http://127.0.0.1:9/a", token=alpha, subscription="beta").status_code == 403
    assert [h["subscription"] for h in api.req("GET", "/v1/webhooks", token=alpha).json()["value"]] == ["alpha"]
    assert api.req("GET", f"/v1/webhooks/{hook['id']}", token=alpha).status_code == 404  # not its subscription

    for body in (
        {"url": "ftp://127.0.0.1/x"},
        {"url": "http://127.0.0.1:99999/x"},
        {"url": "http://127.0.0.1/x", "secret": "hunter2"},
        {"url": "http://127.0.0.1/x", "types": ["cvmotion.%"]},
        {"url": "http://127.0.0.1/x", "maxDeliveryAttempts": 0},
        {"url": "http://127.0.0.1/x", "colour": "blue"},
        ["http://127.0.0.1/x"],
    ):
        bad = api.req("POST", "/v1/webhooks", body)
        assert bad.status_code == 400, (body, bad.text)
        assert bad.json()["error"]["code"] == "InvalidRequestContent"
    assert api.req("DELETE", f"/v1/webhooks/{hook['id']}", token=reader).status_code == 403
    assert api.req("DELETE", f"/v1/webhooks/{hook['id']}").json() == {"deleted": hook["id"]}
    assert api.req("GET", f"/v1/webhooks/{hook['id']}").status_code == 404
    assert api.req("DELETE", f"/v1/webhooks/{hook['id']}").status_code == 404


# -- delivery --------------------------------------------------------------------------------------------


def test_a_signed_cloud_event_arrives_for_each_matching_event(api: Api) -> None:
    with WebhookReceiver(SECRET) as receiver, WebhookReceiver(SECRET) as alpha_receiver:
        hook = create(api, receiver.url, types=["cvmotion.migration.completed"]).json()
        alpha = api.token(Role.CONTRIBUTOR, "alpha")
        create(api, alpha_receiver.url, token=alpha)
        record(api, "cvmotion.migration.started", "a")  # another type
        record(api, "cvmotion.migration.completed", "a", totalMs=900, downtimeMs=40)
        record(api, "cvmotion.migration.completed", "b", sub="alpha", totalMs=700, downtimeMs=30)
        got = receiver.wait_for(lambda r: len(r) >= 2)
        alpha_got = alpha_receiver.wait_for(lambda r: len(r) >= 1)
    first = got[0]
    assert first.headers["content-type"] == "application/cloudevents+json; charset=utf-8"
    assert first.headers["webhook-id"] == first.event["id"]
    assert first.event["type"] == "cvmotion.migration.completed"
    assert first.event["data"]["totalMs"] == 900
    assert [r.event["subject"].split("/")[2] for r in got] == ["default", "alpha"]
    assert receiver.refused == 0
    assert not any(r.duplicate for r in got)
    # A webhook of subscription alpha gets alpha's events (and the fleet's), never another subscription's.
    assert [r.event["subject"].split("/")[2] for r in alpha_got] == ["alpha"]
    counts = api.req("GET", f"/v1/webhooks/{hook['id']}").json()["deliveries"]
    assert counts == {"Pending": 0, "Succeeded": 2, "DeadLettered": 0}


def test_retry_after_the_receiver_was_down(api: Api) -> None:
    port = free_port()
    hook = create(api, f"http://127.0.0.1:{port}/hook").json()
    record(api, "cvmotion.migration.failed", "a", reason="DestinationUnreachable")
    wait_until(lambda: any(d["attempts"] >= 1 and d["lastStatus"] == 0 for d in deliveries(api, hook["id"])))
    with WebhookReceiver(SECRET, port=port) as receiver:
        [arrived] = receiver.wait_for(lambda r: len(r) == 1)
        wait_until(lambda: deliveries(api, hook["id"])[0]["state"] == "Succeeded")
    assert arrived.event["data"]["reason"] == "DestinationUnreachable"
    assert deliveries(api, hook["id"])[0]["attempts"] >= 2


def test_dead_letter_after_the_last_attempt_then_redelivery(api: Api) -> None:
    status = {"code": 500}
    with WebhookReceiver(SECRET, respond=lambda _r: status["code"]) as receiver:
        hook = create(api, receiver.url, maxDeliveryAttempts=2).json()
        record(api, "cvmotion.maintenance.fallback", "a", pauseMs=180)
        wait_until(lambda: bool(deliveries(api, hook["id"], "DeadLettered")))
        [dead] = deliveries(api, hook["id"], "DeadLettered")
        assert dead["attempts"] == 2
        assert dead["lastStatus"] == 500
        assert dead["lastError"] == "HTTP 500"
        assert len(receiver.received) == 2  # both attempts arrived, and were refused
        metrics = api.req("GET", "/metrics").text
        assert 'cvmotion_webhook_deliveries{state="DeadLettered"} 1.0' in metrics
        status["code"] = 200
        again = api.req("POST", f"/v1/webhooks/{hook['id']}/deliveries/{dead['id']}/redeliver")
        assert again.status_code == 200
        assert again.json()["state"] == "Pending"
        wait_until(lambda: deliveries(api, hook["id"])[0]["state"] == "Succeeded")
    assert deliveries(api, hook["id"])[0]["attempts"] == 1
    assert api.req("POST", f"/v1/webhooks/{hook['id']}/deliveries/999/redeliver").status_code == 404


def test_a_retried_event_is_recognised_by_its_id(api: Api) -> None:
    answers = iter([503])  # the receiver took the first delivery but its answer was an error: sent again

    with WebhookReceiver(SECRET, respond=lambda _r: next(answers, 204)) as receiver:
        create(api, receiver.url)
        record(api, "cvmotion.vm.postMigrationAttestation", "a", old={"chipId": "aa"}, new={"chipId": "bb"})
        first, second = receiver.wait_for(lambda r: len(r) >= 2)[:2]
    assert first.webhook_id == second.webhook_id == first.event["id"]
    assert (first.duplicate, second.duplicate) == (False, True)
    assert first.body == second.body
    assert receiver.events() == [first.event]


def test_a_stalled_receiver_holds_up_no_other_webhook(api: Api) -> None:
    release = threading.Event()

    def stall(_r: Received) -> int:
        release.wait(30)
        return 204

    try:
        with WebhookReceiver(SECRET, respond=stall) as slow, WebhookReceiver(SECRET) as quick, FakeHost("h1") as h1:
            create(api, slow.url)
            create(api, quick.url)
            for i in range(5):
                record(api, "cvmotion.migration.started", f"v{i}")
            arrived = quick.wait_for(lambda r: len(r) == 5, timeout=20)
            assert len(slow.received) == 1  # one delivery in flight to the stalled receiver, not five
            # The controller's own work goes on: a VM is placed and created on a host meanwhile.
            assert api.register(h1).status_code == 200
            assert api.wait(api.create("rg1", "during-stall"))["status"] == "Succeeded"
            release.set()
            slow.wait_for(lambda r: len(r) == 5, timeout=20)
    finally:
        release.set()
    assert [r.event["subject"].rsplit("/", 1)[-1] for r in arrived] == [f"v{i}" for i in range(5)]
