"""control layer: the webhook delivery threads of one replica — a scan that fans out, workers that POST.

The scan thread wakes on this replica's outbox notifier (an event committed here) or every ``poll_s`` (other
replicas' events, retries coming due), fans new events out to deliveries (``control.webhooks``), prunes old
ones, and kicks the delivery threads when one is due.  It never POSTs, so no receiver can slow it.  Each
delivery thread claims one due delivery, POSTs its CloudEvent (structured mode,
``application/cloudevents+json``, signed as ``control.webhook_signing`` says) with bounded timeouts, records
the answer, and goes again while there is work.  The database transactions are short and never span the
POST, so a slow or dead receiver holds one delivery thread for at most its timeouts and blocks nothing else
(drains, operations, the API, other webhooks).  Idle, the workers wait for a kick (and look by themselves
only every ``IDLE_POLLS`` polls).
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from cvmotion.control import webhooks
from cvmotion.control.db import DeliveryState
from cvmotion.control.outbox import Notifier, notifier
from cvmotion.control.webhook_signing import signature_headers
from cvmotion.control.webhooks import Attempt, RetryPolicy
from cvmotion.control.worker import _fault as fault_point  # the crash tests' one hook

__all__ = ["DeliveryOptions", "WebhookDispatcher"]

log = logging.getLogger("cvmotion.control.webhooks")
CONTENT_TYPE = "application/cloudevents+json; charset=utf-8"
IDLE_POLLS = 10


@dataclass(frozen=True, slots=True)
class DeliveryOptions:
    threads: int = 4
    # Each phase of a POST (write, read; connect at most 2 s): a receiver answers at once and works later,
    # as Standard Webhooks asks.  The claim's lease covers every phase.
    timeout_s: float = 5.0
    poll_s: float = 1.0
    # The scan looks at most this often: a burst of commits (a create storm writes an event per VM) is one
    # scan, not one per event.  Measured: a scan per event took ~30 % of the controller's CPU under load.
    min_scan_interval_s: float = 0.1
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    keep_succeeded_s: float = 7 * 86400.0  # then a delivered delivery is forgotten (its event stays)
    keep_dead_s: float = 30 * 86400.0  # a dead-lettered one, for the operator to see or redeliver first
    prune_every_s: float = 600.0


class WebhookDispatcher:
    def __init__(
        self,
        engine: Engine,
        reader: Engine,
        replica: str,
        *,
        options: DeliveryOptions | None = None,
        write_lock: threading.Lock | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.engine = engine
        self.reader = reader
        self.replica = replica
        self.options = options or DeliveryOptions()
        self.write_lock = write_lock
        self.clock = clock
        self.rng = rng or random.Random()
        self.notifier = notifier(engine.url)
        self._kick = Notifier()  # the scan found due work
        self._rng_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._next_prune = 0.0

    @property
    def connect_s(self) -> float:
        return min(self.options.timeout_s, 2.0)

    @property
    def lease_s(self) -> float:
        return self.connect_s + 2 * self.options.timeout_s + 3.0

    def start(self) -> None:
        self._spawn(f"{self.replica}-webhook-scan", self._scan_loop)
        for i in range(self.options.threads):
            worker = f"{self.replica}-webhook-{i}"
            self._spawn(worker, lambda w=worker: self._deliver_loop(w))  # type: ignore[misc]

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def wake(self) -> None:
        self.notifier.notify()

    def stop(self) -> None:
        self._stop.set()
        self.notifier.notify()
        self._kick.notify()
        deadline = time.monotonic() + self.lease_s  # an attempt in flight ends within its lease
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0.0))

    def _write(self) -> contextlib.AbstractContextManager[Any]:
        return self.write_lock if self.write_lock is not None else contextlib.nullcontext()

    def _backoff(self, attempts: int) -> float:
        with self._rng_lock:
            return self.options.retry.delay(attempts, self.rng)

    # -- one step ------------------------------------------------------------------------------------

    def prune(self) -> int:
        """Forget old deliveries (every ``prune_every_s``, by one thread of each replica); how many."""
        now = self.clock()
        if now < self._next_prune:
            return 0
        self._next_prune = now + self.options.prune_every_s
        opts = self.options
        with self._write(), Session(self.engine) as session, session.begin():
            return webhooks.prune_deliveries(session, now, opts.keep_succeeded_s, opts.keep_dead_s)

    def scan(self) -> float:
        """Fan out new events; when the next delivery is due (``now``: one is due; ``inf``: none pending)."""
        now = self.clock()
        with Session(self.reader) as session, session.begin():
            fan = webhooks.fan_out_due(session)
            due = webhooks.next_due(session, now)
        if fan:
            with self._write(), Session(self.engine) as session, session.begin():
                webhooks.fan_out(session, now)
            return now
        return float("inf") if due is None else due

    def deliver_one(self, worker: str, client: httpx.Client) -> bool:
        """Claim a due delivery, POST it, record the answer; whether there was one."""
        now = self.clock()
        with Session(self.reader) as session, session.begin():
            due = webhooks.next_due(session, now)
        if due is None or due > now:  # a read first: idle workers never queue for the write lock
            return False
        with self._write(), Session(self.engine) as session, session.begin():
            attempt = webhooks.claim_delivery(session, worker, now, self.lease_s)
        if attempt is None:
            return False  # another thread or replica took it
        fault_point("Webhook:Claimed")
        status, error = self._post(client, attempt)
        fault_point("Webhook:Answered")
        with self._write(), Session(self.engine) as session, session.begin():
            state = webhooks.record_outcome(session, attempt, worker, self.clock(), status, error, self._backoff)
        if state is DeliveryState.DEAD_LETTERED:
            log.warning("webhook %s: event %s dead-lettered: %s", attempt.webhook_id, attempt.event_id, error)
        return True

    def _post(self, client: httpx.Client, attempt: Attempt) -> tuple[int, str]:
        headers = signature_headers(attempt.secret, str(attempt.event_id), int(self.clock()), attempt.body)
        headers |= {"content-type": CONTENT_TYPE, "user-agent": "cvmotion-webhooks/1"}
        try:
            # Streamed and closed unread: only the status matters, and a receiver cannot make us read a body.
            with client.stream("POST", attempt.url, content=attempt.body, headers=headers) as response:
                status = response.status_code
        except (httpx.HTTPError, ValueError, OSError) as exc:
            return 0, f"{type(exc).__name__}: {exc}"[:500]
        return status, "" if 200 <= status < 300 else f"HTTP {status}"

    def _scan_loop(self) -> None:
        # Never POSTs, so a stalled receiver cannot delay it: it wakes on this replica's commits (and polls
        # for other replicas' and for retries coming due), fans out, prunes, and kicks the delivery threads.
        while not self._stop.is_set():
            seen = self.notifier.generation
            try:
                self.prune()
                due = self.scan()
            except Exception:
                log.exception("webhook fan-out failed (database unavailable?); retrying")
                due = float("inf")
            now = self.clock()
            if due <= now:
                self._kick.notify()
            # Commits during this pause raise the generation: the wait below then returns at once.
            if self._stop.wait(self.options.min_scan_interval_s):
                return
            self.notifier.wait(seen, self.options.poll_s if due <= now else min(self.options.poll_s, due - now))

    def _deliver_loop(self, worker: str) -> None:
        timeout = httpx.Timeout(self.options.timeout_s, connect=self.connect_s)
        with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
            while not self._stop.is_set():
                seen = self._kick.generation
                try:
                    if self.deliver_one(worker, client):
                        continue
                except Exception:
                    log.exception("webhook delivery failed (database unavailable?); retrying")
                # Kicked by the scan; a slow look of its own in case a kick came while it was busy.
                self._kick.wait(seen, self.options.poll_s * IDLE_POLLS)
