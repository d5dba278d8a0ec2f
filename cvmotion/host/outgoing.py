"""host layer: outgoing live migrations — ask the destination for a slot, run the engine, settle the VM's record.

The engine (``migration.sender``) does the protocol; this module owns what the host records around it: the VM is
MIGRATING from the moment the destination agreed (its record says whom to ask, before anything can freeze it),
then MIGRATED on the commit receipt, RUNNING again on an abort, or AWAITING_DESTINATION when the verdict is
unknown (``host.recovery`` polls the destination until it answers).  The VM's lock is held for the whole run.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import threading
from collections.abc import Callable

from cvmotion.errors import Conflict, NotFound
from cvmotion.host.context import HostContext
from cvmotion.host.peer_client import PeerClient
from cvmotion.host.recovery import Recovery
from cvmotion.host.store import VmRecord, VmState
from cvmotion.migration.options import MigrationOptions
from cvmotion.migration.sender import Destination, Sender, new_migration_id
from cvmotion.migration.stats import MigrationOutcome, MigrationStats, MigrationStatus

__all__ = ["OutgoingMigrations"]


_SETTLING_S = 10.0  # a settled migration's own bookkeeping: a state file written and fsynced


class OutgoingMigrations:
    """The migrations that leave this host."""

    def __init__(self, context: HostContext, peer_client: Callable[[], PeerClient], recovery: Recovery) -> None:
        self.config, self.store, self.events = context.config, context.store, context.events
        self.platform, self.migrations = context.platform, context.migrations
        self.peer_client = peer_client
        self.recovery = recovery
        self.senders: dict[str, Sender] = {}

    def migrate(self, record: VmRecord, destination_url: str, options: MigrationOptions) -> MigrationStats:
        """Start a live migration of ``record``'s VM to the host daemon at ``destination_url``; returns at once."""
        name = record.name
        if record.client is None or record.handle is None or record.state is not VmState.RUNNING:
            raise Conflict(f"VM {name!r} is not running here (state: {record.state})")
        if not self._lock_for_migration(record):
            raise Conflict(f"VM {name!r} is already migrating")
        try:
            mig_id = new_migration_id()
            session_id = os.urandom(16)
            dest = self._request_incoming(destination_url, record, options, mig_id, session_id)
            stats = MigrationStats(
                id=mig_id, vm=name, source=self.config.name, destination=dest.name or destination_url
            )
            sender = Sender(
                stats=stats,
                platform=self.platform(),
                vm=record.client,
                handle=record.handle,
                policy_doc=base64.b64decode(record.migration_policy),
                destination=dest,
                options=options,
                events=lambda kind, data: self.events.publish(kind, data, subject=name),
                on_finished=lambda st: self._finished(record, st),
                session_id=session_id,
            )
            record.migrations.append(mig_id)
            record.state = VmState.MIGRATING
            # Written before anything can freeze the VM, so a restarted daemon knows whom to ask.
            record.pending_recovery = {
                "migration": mig_id,
                "destination": destination_url,
                "dest_migration": dest.migration_id,
            }
            self.store.save(record)
            self.migrations[mig_id] = stats
            self.senders[mig_id] = sender
        except BaseException:
            record.lock.release()
            raise
        threading.Thread(target=sender.run, name=f"migrate-{mig_id}", daemon=True).start()
        return stats

    def _lock_for_migration(self, record: VmRecord) -> bool:
        """The VM's migration lock, without waiting on a migration under way. A previous migration whose status is
        already final may still be recording its end (the VM's state, saved with fsync) before it lets go: a
        client that saw "failed, resumed on source" and asks again at once waits for that, bounded, not a 409."""
        previous = self.migrations.get(record.migrations[-1]) if record.migrations else None
        if previous is not None and previous.status.settled:
            return record.lock.acquire(timeout=_SETTLING_S)
        return record.lock.acquire(blocking=False)

    def _request_incoming(
        self, url: str, record: VmRecord, options: MigrationOptions, mig_id: str, session_id: bytes
    ) -> Destination:
        body = {
            "vm": record.name,
            "spec": json.loads(record.spec.to_json()),
            "session_id": session_id.hex(),
            "options": options.to_json(),
            "source": self.config.name,
            "source_migration": mig_id,
            "policy": record.policy,
            "migration_policy": record.migration_policy,
            "measurement": record.measurement,
        }
        return self.peer_client().incoming(url, body)

    def _finished(self, record: VmRecord, stats: MigrationStats) -> None:
        try:
            if stats.status is MigrationStatus.COMPLETED:
                destination = (record.pending_recovery or {}).get("destination")
                if isinstance(destination, str):
                    self.store.moved[record.name] = destination.rstrip("/")
                record.state = VmState.MIGRATED
                record.pending_recovery = None
                record.client = None
            elif stats.outcome is MigrationOutcome.RESUMED_ON_SOURCE:
                record.state = VmState.RUNNING
                record.pending_recovery = None
            else:
                record.state = VmState.AWAITING_DESTINATION
                self.recovery.start_polling(record)
            self.store.save(record)
            if record.state is VmState.MIGRATED:
                self.store.forget(record)
        finally:
            with contextlib.suppress(RuntimeError):
                record.lock.release()

    def cancel(self, mig_id: str) -> None:
        sender = self.senders.get(mig_id)
        if sender is None:
            raise NotFound(f"no outgoing migration {mig_id!r} on this host")
        sender.cancel.set()
