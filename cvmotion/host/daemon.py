"""host layer: the host daemon — untrusted hypervisor-side control of one host: its wiring.

It starts the host's platform process (if absent) and wires the rooms of the daemon together, each a module
with one job: ``host.lifecycle`` (create, spawn, re-attach, inspect, delete VMs), ``host.outgoing`` and
``host.incoming`` (the two directions of live migration; the incoming side owns the migration listener),
``host.recovery`` (half-done migrations after a crash), ``host.store`` (the VM records), ``host.peer_client``
(host-to-host calls) and ``host.standby`` (a warm VM process).  The host API (``host.api``) calls this class.

Files under ``--data-dir``::

    chip.json, chip.secret   the emulated chip's identity, its trust anchor and pool credential: the platform
    trust-anchor.pem, pool-* process's own (``platformd.provision``), never written by the daemon
    host-cert.pem, host-key.pem, peer-cas.pem   the daemon's pool-issued credential for host-to-host calls
    platform.sock            the platform process (SP + MA)
    vms/<name>/              vm.json (spec), meta.json (handle, measurement, policy), control.sock, vm.log
    standby/<id>/            a warm VM process waiting to become the next VM (``host.standby``)
    events.jsonl             every event, CloudEvents JSON
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cvmotion.errors import CvmError, NotFound, UsageError
from cvmotion.host.config import DEFAULT_GUEST_POLICY, SPAWN_TIMEOUT, HostConfig
from cvmotion.host.context import HostContext
from cvmotion.host.events import EventBus
from cvmotion.host.incoming import IncomingMigrations
from cvmotion.host.lifecycle import VmLifecycle
from cvmotion.host.maintenance import MaintenanceRunner
from cvmotion.host.outgoing import OutgoingMigrations
from cvmotion.host.peer_client import PeerClient
from cvmotion.host.peers import HOST_CERT_FILE, PeerAuth, issue_host_credential
from cvmotion.host.recovery import OutcomeStore, Recovery
from cvmotion.host.scheduled_events import (
    ScheduledEventsDocument,
    ScheduledEventsRecord,
    ScheduledEventsStore,
    StartRequests,
)
from cvmotion.host.standby import StandbyPool
from cvmotion.host.store import UNSETTLED, VmRecord, VmState, VmStore
from cvmotion.migration.options import MigrationOptions
from cvmotion.migration.stats import MigrationStats, MigrationStatus
from cvmotion.platformd.client import PlatformClient
from cvmotion.vmd.client import VmClient

__all__ = ["DEFAULT_GUEST_POLICY", "HostConfig", "HostDaemon", "VmRecord"]

log = logging.getLogger("cvmotion.host")
_ENDED = (MigrationStatus.COMPLETED, MigrationStatus.FAILED, MigrationStatus.CANCELLED)


class HostDaemon:
    """One host. Thread-safe; the API layer calls it from worker threads."""

    def __init__(self, config: HostConfig) -> None:
        self.config = config
        self.dir = config.data_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.store = VmStore(self.dir / "vms")
        self.events = EventBus(f"/hosts/{config.name}", self.dir / "events.jsonl")
        self.migrations: dict[str, MigrationStats] = {}
        self.platform: PlatformClient | None = None
        self._platform_lock = threading.Lock()
        self.identity: dict[str, Any] = {}  # the platform's PlatformIdentity, once started
        self._stop = threading.Event()
        self.peers = PeerAuth(cas=())  # loaded at start: host-to-host calls need the pool-issued credential
        self.peer_client = PeerClient(self.peers)
        self.recovery = Recovery(
            self.store,
            OutcomeStore(self.dir / "incoming"),
            self.platform_client,
            lambda: self.peer_client,
            self.events,
            self.migrations,
            self._stop,
        )
        self.standby = StandbyPool(
            self.dir / "standby",
            self._platform_socket,
            lambda call: self.lifecycle.relay(call),
            enabled=config.standby,
            timeout=SPAWN_TIMEOUT,
        )
        context = HostContext(config, self.store, self.events, self.platform_client, self.migrations)
        self.scheduled_events = ScheduledEventsStore(self.dir / "scheduledevents")
        self.lifecycle = VmLifecycle(
            context, self.standby, self.recovery, on_scheduled_events_post=self._guest_scheduled_events_post
        )
        self.outgoing = OutgoingMigrations(context, lambda: self.peer_client, self.recovery)
        self.incoming_migrations = IncomingMigrations(context, self.lifecycle, self.recovery)
        # The host API's verbs are the rooms' own methods.
        self.create_vm = self.lifecycle.create
        self.get_vm = self.lifecycle.get
        self.vm_info = self.lifecycle.info
        self.kv = self.lifecycle.kv
        self.attestation = self.lifecycle.attestation
        self.console = self.lifecycle.console
        self.cancel = self.outgoing.cancel
        self.incoming = self.incoming_migrations.incoming
        self.outcome = self.incoming_migrations.outcome
        self.maintenance = MaintenanceRunner(self)
        # Set while the SP state is sealed and a successor platform opens it: no other platform may start then.
        self.handing_over = False
        self.api_socket: socket.socket | None = None  # the host API's listening socket (``cli.host`` binds it)
        self._prepared = False

    @property
    def vms(self) -> dict[str, VmRecord]:
        return self.store.records

    @property
    def migration_port(self) -> int:
        return self.incoming_migrations.port

    # -- start-up -----------------------------------------------------------------------------------

    def prepare(self) -> None:
        """What a start needs that touches nothing another daemon of this host uses (a successor does it before it
        takes over): the host credential."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._ensure_host_credential()
        self.peers = PeerAuth.load(self.dir)
        self.peer_client = PeerClient(self.peers, incoming_timeout=SPAWN_TIMEOUT + 10)
        self._prepared = True

    def start(self, *, migration_socket: socket.socket | None = None) -> None:
        """Start (or take over, after a predecessor's update in place: ``migration_socket`` is its listener)."""
        if not self._prepared:
            self.prepare()
        self.identity = dict(self.platform_client().identity())
        self.incoming_migrations.listen(migration_socket)
        self.standby.clean()
        self.lifecycle.reattach()
        # VMs a predecessor paused for an update in place run again before anything else here.
        self.maintenance.resume_after_start()
        self.events.publish("HostStarted", self.host_info())
        self.standby.refill()

    def _ensure_host_credential(self) -> None:
        """Operator step, done here for convenience: the pool CA issues this daemon its host credential, which
        signs its calls to other hosts (``host.peers``). The platform provisions its own chip and pool
        credential (``platformd.provision``): nothing the secure processor or the MA trusts is written here."""
        from cvmotion.agent.pool import open_pool_ca

        ca_dir = self.config.pool_ca_dir
        if ca_dir is None or (self.dir / HOST_CERT_FILE).exists():
            return
        now = datetime.now(UTC)
        authority = open_pool_ca(ca_dir, now=now)
        issue_host_credential(authority, self.dir, host=self.config.name, pool=self.config.pool, now=now)

    def _platform_socket(self) -> Path:
        return self.dir / "platform.sock"

    def platform_command(self) -> list[str]:
        """How this host starts its platform process (the newest installed code: a fresh interpreter)."""
        path = self._platform_socket()
        cmd = [sys.executable, "-m", "cvmotion.platformd", "--data-dir", str(self.dir), "--socket", str(path)]
        if self.config.kds_url:
            cmd += ["--kds", self.config.kds_url]
        if self.config.vendor_dir is not None:
            cmd += ["--vendor-dir", str(self.config.vendor_dir)]
        # First-start provisioning is the platform's own (its chip, its pool credential): the daemon only says
        # what the operator asked for; on later starts the platform keeps what it has.
        cmd += ["--product", self.config.product, "--pool", self.config.pool]
        if self.config.pool_ca_dir is not None:
            cmd += ["--pool-ca-dir", str(self.config.pool_ca_dir)]
        return cmd

    def _start_platform(self) -> PlatformClient:
        """Connect to the platform process, starting it (``python -m cvmotion.platformd``) if it is not there."""
        path = self._platform_socket()
        with contextlib.suppress(CvmError, OSError):
            return PlatformClient.connect(str(path))
        if self.handing_over:
            # The sealed SP state is its successor's to open; a platform started here would race it for it.
            raise UsageError("the platform process is being replaced (an update in place): try again in a moment")
        log_file = (self.dir / "platform.log").open("ab")
        proc = subprocess.Popen(self.platform_command(), stdout=log_file, stderr=log_file, start_new_session=True)
        deadline = time.monotonic() + SPAWN_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = (self.dir / "platform.log").read_text(errors="replace")[-2000:]
                raise UsageError(f"the platform process exited ({proc.returncode}): {tail.strip()}")
            with contextlib.suppress(CvmError, OSError):
                return PlatformClient.connect(str(path))
            time.sleep(0.05)
        raise UsageError("the platform process did not come up in time")

    def platform_client(self) -> PlatformClient:
        """The platform process's client (reconnected, or the process restarted, when its connection closed)."""
        with self._platform_lock:
            if self.platform is None or self.platform.closed:
                self.platform = self._start_platform()
            return self.platform

    def stop(self) -> None:
        self._stop.set()
        self.standby.close()
        self.incoming_migrations.stop()

    # -- an update in place (``host.maintenance``) ---------------------------------------------------------

    def running_vms(self) -> list[str]:
        """VMs whose vCPUs this host runs now (with a live VM process)."""
        live = [r for r in self.store.live() if r.client is not None and not r.client.closed]
        return [r.name for r in live if r.state is VmState.RUNNING]

    def migrating_vms(self) -> list[str]:
        busy = {r.name for r in self.store.live() if r.state in UNSETTLED}
        busy |= {str(s.vm) for s in self.migrations.values() if s.status not in _ENDED}
        return sorted(busy)

    def vm_client(self, name: str) -> VmClient:
        return self.lifecycle.client(name)

    def resume_vm(self, name: str) -> float | None:
        """Resume a VM an update in place paused; returns how long its vCPUs were stopped (seconds), if known."""
        record = self.lifecycle.get(name)
        paused = self.lifecycle.client(name).resume()
        record.state = VmState.RUNNING
        self.store.save(record)
        return paused

    def platform_pid(self) -> int | None:
        """The running platform process of this data directory (a recycled pid is not it), if any."""
        with contextlib.suppress(OSError, ValueError):
            pid = int((self.dir / "platform.pid").read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"cvmotion.platformd" in cmdline and str(self.dir).encode() in cmdline:
                return pid
        return None

    def listening_sockets(self) -> tuple[socket.socket, socket.socket]:
        """The host API's and the migration listener's sockets, which a successor daemon inherits."""
        listener = self.incoming_migrations.listener
        if self.api_socket is None or listener is None:
            raise UsageError("this daemon does not serve its own sockets: it cannot hand them over")
        return self.api_socket, listener

    def seal_platform(self) -> None:
        """The SP seals its state for the next platform process; this one exits."""
        with self._platform_lock:
            if self.platform is None or self.platform.closed:
                self.platform = self._start_platform()
            self.handing_over = True
            try:
                self.platform.seal_state()
            except BaseException:
                self.handing_over = False
                raise
            self.platform = None

    def platform_fallback(self) -> None:
        """The successor platform did not take over: start one here (it opens the sealed state)."""
        self.handing_over = False
        self.platform_client()

    def exit_for_successor(self) -> None:
        """The successor daemon took over: this process stops at once (its sockets are the successor's now)."""
        log.info("handing the host over to the successor daemon")
        logging.shutdown()
        os._exit(0)

    # -- Scheduled Events (``host.scheduled_events``) ------------------------------------------------------

    def put_scheduled_events(self, name: str, document: ScheduledEventsDocument) -> ScheduledEventsDocument:
        record = self.lifecycle.get(name)
        stored = self.scheduled_events.put(name, document)
        client = record.client
        if client is not None and not client.closed:  # into the guest's cvm-io mailbox (else it reads over HTTP)
            with contextlib.suppress(CvmError):
                client.scheduled_events(self.scheduled_events.guest_bytes(name))
        return stored

    def scheduled_events_record(self, name: str) -> ScheduledEventsRecord:
        self.lifecycle.get(name)
        return self.scheduled_events.record(name)

    def approve_scheduled_events(self, name: str, requests: StartRequests) -> list[str]:
        self.lifecycle.get(name)
        return self.scheduled_events.approve(name, requests)

    def _guest_scheduled_events_post(self, name: str, body: bytes) -> None:
        """What a guest posted to its mailbox: IMDS's StartRequests body (anything else is refused)."""
        try:
            requests = StartRequests.model_validate_json(body)
        except ValueError as exc:
            raise UsageError(f"VM {name!r} posted no StartRequests: {exc}") from None
        self.approve_scheduled_events(name, requests)

    def delete_vm(self, name: str, *, force: bool = False) -> None:
        self.lifecycle.delete(name, force=force)
        self.scheduled_events.forget(name)

    # -- identity -----------------------------------------------------------------------------------

    def host_info(self) -> dict[str, Any]:
        return {
            "name": self.config.name,
            "pool": self.config.pool,
            "product": self.identity.get("product"),
            "chip_id": self.identity.get("chip_id"),
            "reported_tcb": self.identity.get("reported_tcb_text"),
            "reported_tcb_raw": self.identity.get("reported_tcb"),
            "firmware": self.identity.get("api"),
            "emulated": self.identity.get("emulated", True),
            "migration_port": self.migration_port,
            "migration_host": self.config.listen_host,
            "vms": len(self.vms),
        }

    # -- the host API's verbs that are more than one room's method -----------------------------------

    def list_vms(self) -> list[dict[str, Any]]:
        return [self.lifecycle.info(r) for r in self.store.live()]

    def migrate(self, name: str, destination_url: str, options: MigrationOptions) -> MigrationStats:
        """Start a live migration of ``name`` to the host daemon at ``destination_url``; returns at once."""
        return self.outgoing.migrate(self.lifecycle.get(name), destination_url, options)

    def migration(self, mig_id: str) -> MigrationStats:
        stats = self.migrations.get(mig_id)
        if stats is None:
            raise NotFound(f"no migration {mig_id!r} on host {self.config.name}")
        return stats
