"""host layer: incoming live migrations — the slot a source asks for, the listener its connections arrive on,
and the verdict it may ask again.

``POST /v1/migrations/incoming`` (authenticated, validated by ``host.api_schema``) makes an *incoming* VM process
and a ticket; the source's control and stream connections present the ticket on the migration listener (TCP)
and are handed to that migration's ``migration.receiver.Receiver``.  Every verdict is persisted before it is
published (``host.recovery.OutcomeStore``), so ``/outcome`` gives the same answer after any restart.
"""

from __future__ import annotations

import base64
import socket
import threading
from typing import Any

from cvmotion.errors import Conflict, CvmError, MigrationError, UsageError
from cvmotion.host.config import DEFAULT_GUEST_POLICY
from cvmotion.host.context import HostContext
from cvmotion.host.lifecycle import VmLifecycle
from cvmotion.host.recovery import Recovery
from cvmotion.host.store import GONE, VmRecord, VmState
from cvmotion.ipc.names import check_name
from cvmotion.migration.channel import FrameKind, FrameSocket
from cvmotion.migration.options import MigrationOptions
from cvmotion.migration.receiver import Receiver
from cvmotion.migration.sender import new_migration_id
from cvmotion.migration.stats import MigrationStats, Verdict
from cvmotion.vmd.protocol import VmMode, VmSpec

__all__ = ["IncomingMigrations"]


class IncomingMigrations:
    """The migrations that arrive on this host, and the listener their connections come in on."""

    def __init__(self, context: HostContext, lifecycle: VmLifecycle, recovery: Recovery) -> None:
        self.config, self.store, self.events = context.config, context.store, context.events
        self.platform, self.migrations = context.platform, context.migrations
        self.lifecycle = lifecycle
        self.recovery = recovery
        self.receivers: dict[str, Receiver] = {}
        self._tickets: dict[str, Receiver] = {}
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self.port = 0

    # -- the migration listener ------------------------------------------------------------------------------

    @property
    def listener(self) -> socket.socket | None:
        return self._listener

    def listen(self, inherited: socket.socket | None = None) -> None:
        """Bind the migration listener, or serve ``inherited`` (a predecessor daemon's, after an update in place)."""
        if inherited is None:
            srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind((self.config.listen_host, self.config.migration_port))
            srv.listen(64)
        else:
            srv = inherited
        srv.settimeout(0.5)
        self._listener = srv
        self.port = srv.getsockname()[1]
        threading.Thread(target=self._accept_loop, args=(srv,), name="migration-listener", daemon=True).start()

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._route, args=(conn,), daemon=True).start()

    def _route(self, conn: socket.socket) -> None:
        sock = FrameSocket(conn, timeout=10.0)
        try:
            _, hello = sock.recv_json(FrameKind.HELLO)
            receiver = self._tickets.get(str(hello.get("ticket", "")))
            if receiver is None:
                raise MigrationError("unknown migration ticket")
            sock.sock.settimeout(receiver.options.io_timeout)
            receiver.attach(sock, hello)
        except (CvmError, OSError, ValueError):
            sock.close()

    def stop(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.close()

    # -- a source's request ------------------------------------------------------------------------------------

    def incoming(self, body: dict[str, Any]) -> dict[str, Any]:
        """A source host's request to receive a VM (``api_schema.IncomingMigration``, validated and authenticated)."""
        name = check_name("VM name", body.get("vm"))
        if body["spec"]["name"] != name:
            raise UsageError(f"spec.name {body['spec']['name']!r} is not the VM {name!r} being migrated")
        with self.store.lock:
            existing = self.store.get(name)
            if existing is not None and existing.state not in GONE:
                raise Conflict(f"a VM named {name!r} already exists on host {self.config.name}")
            self.lifecycle.check_memory_budget(int(body["spec"]["memory"]))
        spec_data = dict(body["spec"])
        spec_data["mode"] = VmMode.INCOMING.value
        # This host's services, not the source's: the paravisor re-attests where the VM now runs.
        spec_data["attestation_url"] = self.config.attestation_url
        spec_data["key_release_url"] = self.config.key_release_url
        spec = VmSpec(**{k: v for k, v in spec_data.items() if k in VmSpec.__dataclass_fields__})
        options = MigrationOptions.from_json(dict(body.get("options", {})))
        session_id = bytes.fromhex(str(body["session_id"]))
        mig_id = new_migration_id()
        stats = MigrationStats(id=mig_id, vm=name, source=str(body.get("source", "")), destination=self.config.name)
        client = self.lifecycle.spawn(spec)
        record = VmRecord(
            name=name,
            spec=spec,
            client=client,
            policy=int(body.get("policy", DEFAULT_GUEST_POLICY)),
            migration_policy=str(body.get("migration_policy", "")),
            measurement=str(body.get("measurement", "")),
            state=VmState.INCOMING,
        )
        record.migrations.append(mig_id)
        self.store.add(record)
        self.store.save(record)
        self.recovery.outcomes.put(mig_id, name, Verdict.IN_PROGRESS)

        def events(kind: str, data: dict[str, Any]) -> None:
            # A verdict is persisted before it is published, so /outcome survives a daemon restart.
            token = receiver.commit_receipt if kind == "MigrationCommitted" else receiver.abort_token
            self.recovery.incoming_event(record, mig_id, kind, data, token)
            self.events.publish(kind, data, subject=name)

        receiver = Receiver(
            stats=stats,
            platform=self.platform(),
            vm=client,
            session_id=session_id,
            streams=options.streams,
            options=options,
            events=events,
            on_finished=lambda r: self._finished(record, r),
        )
        ticket = base64.urlsafe_b64encode(session_id + mig_id.encode()).decode()
        self.migrations[mig_id] = stats
        self.receivers[mig_id] = receiver
        self._tickets[ticket] = receiver
        threading.Thread(target=receiver.run, name=f"incoming-{mig_id}", daemon=True).start()
        self.events.publish("MigrationIncoming", {"id": mig_id, "vm": name, "source": stats.source}, subject=name)
        adv_host, adv_port = self.config.listen_host, self.port
        if self.config.migration_advertise:
            adv_host, _, port_text = self.config.migration_advertise.rpartition(":")
            adv_port = int(port_text)
        return {
            "migration": mig_id,
            "host": adv_host,
            "port": adv_port,
            "ticket": ticket,
            "name": self.config.name,
        }

    def _finished(self, record: VmRecord, receiver: Receiver) -> None:
        self.lifecycle.standby.refill()  # the host is quiet again: the next VM's process can start now
        if receiver.committed.is_set():
            record.handle = receiver.handle
            record.state = VmState.RUNNING
            self.store.save(record)
            self.events.publish(
                "VmArrived",
                {"vm": record.name, "handle": record.handle, "migration": receiver.stats.id},
                subject=record.name,
            )
        else:
            record.state = VmState.DELETED
            self.store.save(record)
            self.store.forget(record)

    def outcome(self, mig_id: str) -> dict[str, Any]:
        """The verdict of an incoming migration, for a source that lost its connection (or its daemon)."""
        receiver = self.receivers.get(mig_id)
        if receiver is not None:
            return receiver.outcome()
        return self.recovery.outcomes.outcome(mig_id)
