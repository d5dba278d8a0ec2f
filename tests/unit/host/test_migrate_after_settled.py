"""A migration asked for right after the previous one reported its end waits for that one's bookkeeping, bounded;
one asked for while another is under way is refused at once (CI: a retry after "failed, resumed on source" got
409 "already migrating" while the first was still saving the VM's state)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any, cast

from cvmotion.host.outgoing import OutgoingMigrations
from cvmotion.migration.stats import MigrationStats, MigrationStatus


def _outgoing(status: MigrationStatus) -> tuple[OutgoingMigrations, Any]:
    outgoing = OutgoingMigrations.__new__(OutgoingMigrations)
    previous = MigrationStats(id="m1", vm="vm", source="a", destination="b")
    previous.status = status
    outgoing.migrations = {"m1": previous}
    record = SimpleNamespace(lock=threading.Lock(), migrations=["m1"])
    record.lock.acquire()  # the previous migration's thread still holds it
    return outgoing, record


def test_a_settled_migration_is_waited_for() -> None:
    outgoing, record = _outgoing(MigrationStatus.FAILED)
    threading.Timer(0.05, record.lock.release).start()  # its bookkeeping ends
    assert outgoing._lock_for_migration(cast(Any, record))


def test_a_migration_under_way_is_not_waited_for() -> None:
    outgoing, record = _outgoing(MigrationStatus.ACTIVE)
    started = time.monotonic()
    assert not outgoing._lock_for_migration(cast(Any, record))
    assert time.monotonic() - started < 1.0
    record.lock.release()
