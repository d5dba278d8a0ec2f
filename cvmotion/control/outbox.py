"""control layer: the events table as an ordered outbox — ids in commit order, and a wake-up per commit.

Every ``Event`` row is written in the transaction of the change it reports, so the table is a durable
outbox.  Readers (Server-Sent Events, the webhook fan-out) follow it with a cursor, ``id > last``, which is
only sound if an id becomes visible after every smaller one: a row committed with id 11 while id 10 is
still uncommitted would be skipped for ever.  SQLite gives that for free (``BEGIN IMMEDIATE``: one writer at
a time).  PostgreSQL hands out sequence values at insert time, so two writers can commit out of order; here
every insert into ``events`` first takes a transaction-scoped advisory lock, which it holds until commit,
so ids are handed out in commit order.  To keep that lock short and free of deadlocks, the ORM inserts a
transaction's events last, at commit, after everything else it wrote (its row locks are all held by then,
and the insert waits for nothing but the lock)::

    session.add(Event(...))      held back (not flushed with the rest)
    ... more work, flushes ...   row locks taken as usual
    commit:  flush the rest ──▶ INSERT INTO events (takes the outbox lock) ──▶ COMMIT (releases it)
                                                                              └─▶ wake this process's readers

A consequence: an event added in a transaction is not visible to that transaction's own queries.  An
event added inside a SAVEPOINT (``begin_nested``) that rolls back is dropped with it.

``notifier(url)`` is the in-process wake-up: readers of this process wait on it instead of polling fast,
and poll slowly (bounded) for what other replicas commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, SessionTransaction

__all__ = ["Notifier", "install", "notifier"]

EVENTS_TABLE = "events"
# An arbitrary 64-bit key naming "the cvmotion events outbox" among the database's advisory locks.
_OUTBOX_LOCK_KEY = 0x63766D2D6F7574 - (1 << 62)
_HELD = "cvmotion.outbox.held"  # session.info: this transaction's events, inserted at commit
_RELEASING = "cvmotion.outbox.releasing"
_WROTE = "cvmotion.outbox.wrote"
_MARKS = "cvmotion.outbox.savepoints"  # SAVEPOINT -> how many events were held when it began
_INSERT = f"INSERT INTO {EVENTS_TABLE} "


class Notifier:
    """A generation counter that threads and asyncio tasks wait on; ``notify`` bumps it and wakes them all."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._generation = 0
        self._async: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    @property
    def generation(self) -> int:
        return self._generation

    def notify(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()
            waiters = list(self._async)
        for loop, flag in waiters:
            with contextlib.suppress(RuntimeError):  # a loop closed since it registered
                loop.call_soon_threadsafe(flag.set)

    def wait(self, seen: int, timeout: float) -> bool:
        """Block until the generation moves past ``seen`` or ``timeout`` passes; whether it moved."""
        with self._cond:
            return self._cond.wait_for(lambda: self._generation != seen, timeout=max(timeout, 0.0))

    async def wait_async(self, seen: int, timeout: float) -> bool:
        """As ``wait``, without holding a thread: for the API's streams."""
        flag = asyncio.Event()
        key = (asyncio.get_running_loop(), flag)
        with self._cond:
            if self._generation != seen:
                return True
            self._async.add(key)
        try:
            await asyncio.wait_for(flag.wait(), timeout=max(timeout, 0.0))
            return True
        except TimeoutError:
            return self._generation != seen
        finally:
            with self._cond:
                self._async.discard(key)


_notifiers: dict[str, Notifier] = {}
_notifiers_lock = threading.Lock()


def notifier(url: object) -> Notifier:
    """The notifier of a database (by URL): every engine of this process on that database shares it."""
    key = str(url)
    with _notifiers_lock:
        return _notifiers.setdefault(key, Notifier())


def _is_event(obj: object) -> bool:
    return getattr(obj, "__tablename__", None) == EVENTS_TABLE


def _hold_events(session: Session, _context: Any, _instances: Any) -> None:
    if session.info.get(_RELEASING):
        return
    held = [obj for obj in session.new if _is_event(obj)]
    for obj in held:
        session.expunge(obj)
    if held:
        session.info.setdefault(_HELD, []).extend(held)


def _insert_held(session: Session) -> None:
    session.flush()  # everything else first: may hold back events added since the last flush
    held = session.info.pop(_HELD, [])
    if not held:
        return
    session.info[_RELEASING] = True
    try:
        session.add_all(held)
        session.flush()
    finally:
        session.info.pop(_RELEASING, None)
    session.info[_WROTE] = True


def _after_commit(session: Session) -> None:
    if session.info.pop(_WROTE, False):
        bind = session.get_bind()
        notifier(bind.engine.url).notify()


def _after_transaction_create(session: Session, transaction: SessionTransaction) -> None:
    if transaction.nested:  # a SAVEPOINT: what it holds back is dropped if it rolls back
        session.info.setdefault(_MARKS, {})[id(transaction)] = len(session.info.get(_HELD, []))


def _after_soft_rollback(session: Session, previous: SessionTransaction) -> None:
    mark = session.info.get(_MARKS, {}).pop(id(previous), None)
    if previous.nested and mark is not None:
        del session.info.get(_HELD, [])[mark:]


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:  # the outermost transaction: a rollback drops what it held
        session.info.pop(_HELD, None)
        session.info.pop(_WROTE, None)
        session.info.pop(_MARKS, None)


def _lock_before_insert(
    conn: Connection, cursor: Any, statement: str, _params: Any, _context: Any, _executemany: bool
) -> None:
    # Re-entrant within a transaction (PostgreSQL stacks xact advisory locks), released at its end.
    if conn.dialect.name == "postgresql" and statement.lstrip()[: len(_INSERT)].upper() == _INSERT.upper():
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_OUTBOX_LOCK_KEY,))


_installed = threading.Lock()
_done: list[bool] = []


def install() -> None:
    """Register the hooks on every Session and Engine of this process (idempotent)."""
    with _installed:
        if _done:
            return
        event.listen(Session, "before_flush", _hold_events)
        event.listen(Session, "before_commit", _insert_held)
        event.listen(Session, "after_commit", _after_commit)
        event.listen(Session, "after_transaction_create", _after_transaction_create)
        event.listen(Session, "after_soft_rollback", _after_soft_rollback)
        event.listen(Session, "after_transaction_end", _after_transaction_end)
        event.listen(Engine, "before_cursor_execute", _lock_before_insert)
        _done.append(True)
