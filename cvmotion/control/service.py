"""control layer: one controller replica — its database, services, workers and the leader's sweep.

``FleetController.start`` migrates the schema, installs the built-in policies, writes the Owner token
(0600) into the data directory on the first start, and starts the worker threads and the sweep.  The
API (``control.api``) calls ``transaction`` for every request: one database transaction each.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from cvmotion.control.auth import ALL_SUBSCRIPTIONS, Role, issue_token
from cvmotion.control.db import database_url, open_database, reader_for
from cvmotion.control.drain_runner import DrainRunner, release_drain_claims
from cvmotion.control.inventory import Inventory, PlacementContended
from cvmotion.control.leader import Leadership
from cvmotion.control.maintenance_options import MaintenanceOptions
from cvmotion.control.policy_store import PolicyStore
from cvmotion.control.vms import VmService
from cvmotion.control.webhook_delivery import WebhookDispatcher
from cvmotion.control.webhooks import release_claims
from cvmotion.control.windows import open_windows
from cvmotion.control.worker import Worker, reset_claims
from cvmotion.errors import Conflict, UsageError
from cvmotion.files import PRIVATE, write_atomic, write_json

__all__ = ["DEFAULT_WORKERS", "OWNER_TOKEN_FILE", "FleetController", "connect_with_retry"]

log = logging.getLogger("cvmotion.control")
T = TypeVar("T")
OWNER_TOKEN_FILE = "owner.token"
DEFAULT_WORKERS = 8  # operation workers per replica (the live migrations among them: MaintenanceOptions.cluster_limit)
_RETRIES = 5
_RACES = ("40P01", "40001")  # PostgreSQL: deadlock detected, serialization failure
CONFIG_FILE = "controller.json"


def connect_with_retry(url: str, attempts: int = 6) -> Engine:
    """Open and migrate the database, retrying with backoff while it is unreachable (then a clear error)."""
    delay = 0.25
    for attempt in range(1, attempts + 1):
        try:
            return open_database(url)
        except OperationalError as exc:
            if attempt == attempts:
                reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
                raise UsageError(f"the database is unreachable after {attempts} tries: {reason}") from None
            log.warning("database unreachable (try %d/%d), retrying in %.2f s", attempt, attempts, delay)
            time.sleep(delay)
            delay = min(delay * 2, 4.0)
    raise AssertionError("unreachable")


class FleetController:
    def __init__(
        self,
        data_dir: Path,
        db: str | None = None,
        *,
        heartbeat_timeout: float = 6.0,
        workers: int = DEFAULT_WORKERS,
        lease: float = 5.0,
        sweep_period: float = 1.0,
        maintenance: MaintenanceOptions | None = None,
    ) -> None:
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.url = database_url(db, data_dir)
        self.replica = f"replica-{uuid.uuid4().hex[:8]}"
        self.engine = connect_with_retry(self.url)
        self.reader = reader_for(self.engine)
        self.leadership = Leadership(self.engine, data_dir)
        # One controller owns a SQLite file (the leader's file lock): its writers queue on this lock instead
        # of in SQLite's busy handler, which sleeps in steps of up to 100 ms.
        self.write_lock = threading.Lock() if self.leadership.sqlite else None
        self.policy = PolicyStore()
        self.inventory = Inventory(heartbeat_timeout)
        self.vms = VmService(self.policy, self.inventory)
        self.maintenance = maintenance or MaintenanceOptions()
        # Workers carry operations; how many live migrations run at once is the fleet's limit, not their count
        # (a worker beyond it carries creates and deletes while the migrations queue).
        self.workers = [
            Worker(
                self.engine,
                f"{self.replica}-{i}",
                lease=lease,
                write_lock=self.write_lock,
                reader=self.reader,
                parallel_migrations=self.maintenance.cluster_limit,
            )  # fmt: skip
            for i in range(workers)
        ]
        self.webhooks = WebhookDispatcher(self.engine, self.reader, self.replica, write_lock=self.write_lock)
        self.drains = DrainRunner(
            self.engine, f"{self.replica}-drains", self.vms, options=self.maintenance, write_lock=self.write_lock,
            reader=self.reader, wake_workers=self.wake_workers,
        )  # fmt: skip
        self.sweep_period = sweep_period
        self.leader = False
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextlib.contextmanager
    def session(self, *, write: bool = True) -> Iterator[Session]:
        lock = self.write_lock if write and self.write_lock is not None else contextlib.nullcontext()
        with lock, Session(self.engine if write else self.reader, expire_on_commit=False) as session, session.begin():
            yield session

    def transaction(self, body: Callable[[Session], T], *, write: bool = True) -> T:
        """``body`` in one transaction; run again from the start (at most ``_RETRIES`` times) when it
        lost a race that rolled it back whole: a contended placement, a PostgreSQL deadlock or
        serialization failure."""
        for attempt in range(1, _RETRIES + 1):
            try:
                with self.session(write=write) as session:
                    return body(session)
            except PlacementContended:
                if attempt == _RETRIES:
                    raise Conflict("every host that can take the VM is busy with other placements; retry") from None
            except OperationalError as exc:
                if attempt == _RETRIES or getattr(exc.orig, "sqlstate", None) not in _RACES:
                    raise
            time.sleep(0.005 * attempt)  # the winner commits meanwhile
        raise AssertionError("unreachable")

    def wake_workers(self) -> None:
        for worker in self.workers:
            worker.wake.set()

    def start(self) -> None:
        with self.session() as session:
            self.policy.install_builtins(session)
        owner = self.data_dir / OWNER_TOKEN_FILE
        if not owner.exists():
            with self.session() as session:
                token = issue_token(session, Role.OWNER, ALL_SUBSCRIPTIONS)
            write_atomic(owner, (token + "\n").encode(), mode=PRIVATE)
        write_json(self.data_dir / CONFIG_FILE, {"db": self.url.split("@")[-1] if "@" in self.url else self.url})
        if self.leadership.sqlite:
            reset_claims(self.engine)  # the file lock proves no other process holds any claim
            release_drain_claims(self.engine)
            release_claims(self.engine)
        self.leader = self.leadership.try_lead()
        for worker in self.workers:
            self._spawn(f"worker-{worker.id}", lambda w=worker: w.run(self._stop))  # type: ignore[misc]
        self._spawn("sweep", self._sweep_loop)
        self._spawn("drains", lambda: self.drains.run(self._stop))
        self.webhooks.start()

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self.sweep_period):
            try:
                self.leader = self.leadership.try_lead()
                if self.leader:
                    with self.session() as session:
                        self.inventory.sweep(session)
                    with self.session() as session:
                        open_windows(session)  # maintenance windows that opened start their drains
            except Exception:
                log.exception("sweep failed (database unavailable?); next try in %.1f s", self.sweep_period)

    def stop(self) -> None:
        self._stop.set()
        self.wake_workers()
        self.webhooks.stop()
        for thread in self._threads:
            thread.join(10)
        self.leadership.release()
        self.reader.dispose()
        self.engine.dispose()
