"""host layer: the host daemon — untrusted hypervisor-side control of one host.

It owns: the host's platform process (started if absent), its VM processes (started per VM, re-attached
after a daemon restart: they outlive it), the migration engine for both directions, the host API (see
``host.api``) and the migration listener (TCP; the source's control and stream connections arrive here).

Files under ``--data-dir``::

    chip.json, chip.secret   the emulated chip's identity, its trust anchor and pool credential: the platform
    trust-anchor.pem, pool-* process's own (``agent.provision``), never written by the daemon
    host-cert.pem, host-key.pem, peer-cas.pem   the daemon's pool-issued credential for host-to-host calls
    platform.sock            the platform process (SP + MA)
    vms/<name>/              vm.json (spec), meta.json (handle, measurement, policy), control.sock, vm.log
    standby/<id>/            a warm VM process waiting to become the next VM (``host.standby``)
    events.jsonl             every event, CloudEvents JSON
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cvmotion.abi.snp import PolicyFlag
from cvmotion.agent.policy import MigrationPolicy
from cvmotion.agent.vm_process import VmSpec
from cvmotion.errors import Conflict, CvmError, DeviceError, MigrationError, Moved, NotFound, UsageError
from cvmotion.host.events import EventBus
from cvmotion.host.peer_client import PeerClient
from cvmotion.host.peers import HOST_CERT_FILE, PeerAuth, issue_host_credential
from cvmotion.host.recovery import Recovery
from cvmotion.host.standby import StandbyPool
from cvmotion.host.store import GONE, VmRecord, VmState, VmStore
from cvmotion.ipc.names import check_name
from cvmotion.ipc.rpc import RpcError
from cvmotion.migration.channel import FrameKind, FrameSocket
from cvmotion.migration.clients import PlatformClient, VmClient
from cvmotion.migration.options import MigrationOptions
from cvmotion.migration.receiver import Receiver
from cvmotion.migration.sender import Destination, Sender, new_migration_id
from cvmotion.migration.stats import MigrationOutcome, MigrationStats, MigrationStatus, Verdict
from cvmotion.vmm.images import image_path
from cvmotion.vmm.workloads import KvOp, KvStats, KvStatus, decode_response, encode_request

__all__ = ["DEFAULT_GUEST_POLICY", "HostConfig", "HostDaemon", "VmRecord"]

log = logging.getLogger("cvmotion.host")

DEFAULT_GUEST_POLICY = int(PolicyFlag.RESERVED_MBO | PolicyFlag.SMT | PolicyFlag.MIGRATE_MA)
_SPAWN_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class HostConfig:
    name: str
    data_dir: Path
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    migration_port: int = 0
    pool: str = "default"
    product: str = "Genoa"
    vendor_dir: Path | None = None
    kds_url: str | None = None
    attestation_url: str | None = None
    pool_ca_dir: Path | None = None
    migration_advertise: str | None = None
    key_release_url: str | None = None  # HOST:PORT sources should dial (a proxy, NAT) instead of the listener
    standby: bool = True  # keep one warm VM process for the next VM (launch or incoming migration)
    max_guest_memory: int | None = None  # bytes all VMs here may have together (None: no limit)


class HostDaemon:
    """One host. Thread-safe; the API layer calls it from worker threads."""

    def __init__(self, config: HostConfig) -> None:
        self.config = config
        self.dir = config.data_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.store = VmStore(self.dir / "vms")
        self.events = EventBus(f"/hosts/{config.name}", self.dir / "events.jsonl")
        self.vms: dict[str, VmRecord] = {}
        self.migrations: dict[str, MigrationStats] = {}
        self.receivers: dict[str, Receiver] = {}
        self._tickets: dict[str, Receiver] = {}
        self.senders: dict[str, Sender] = {}
        # VM name -> the host API URL it left for (in memory: after a restart a client resolves afresh).
        self.moved: dict[str, str] = {}
        self._lock = threading.RLock()
        self.platform: PlatformClient | None = None
        self.identity: dict[str, Any] = {}
        self._listener: socket.socket | None = None
        self.migration_port = 0
        self._stop = threading.Event()
        self.recovery = Recovery(self)
        self.peers = PeerAuth(cas=())  # loaded at start: host-to-host calls need the pool-issued credential
        self.peer_client = PeerClient(self.peers)
        self.standby = StandbyPool(
            self.dir / "standby", self._platform_socket, self._vm_calls, enabled=config.standby, timeout=_SPAWN_TIMEOUT
        )

    # -- start-up -----------------------------------------------------------------------------------

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._ensure_host_credential()
        self.peers = PeerAuth.load(self.dir)
        self.peer_client = PeerClient(self.peers, incoming_timeout=_SPAWN_TIMEOUT + 10)
        self._ensure_platform()
        self.identity = self.platform_client().identity()
        self._start_listener()
        self.standby.clean()
        self._reattach()
        self.events.publish("HostStarted", self.host_info())
        self.standby.refill()

    def _ensure_host_credential(self) -> None:
        """Operator step, done here for convenience: the pool CA issues this daemon its host credential, which
        signs its calls to other hosts (``host.peers``). The platform provisions its own chip and pool
        credential (``agent.provision``): nothing the secure processor or the MA trusts is written here."""
        from cvmotion.agent.pool import open_pool_ca

        ca_dir = self.config.pool_ca_dir
        if ca_dir is None or (self.dir / HOST_CERT_FILE).exists():
            return
        now = datetime.now(UTC)
        authority = open_pool_ca(ca_dir, now=now)
        issue_host_credential(authority, self.dir, host=self.config.name, pool=self.config.pool, now=now)

    def _platform_socket(self) -> Path:
        return self.dir / "platform.sock"

    def _ensure_platform(self) -> None:
        path = self._platform_socket()
        with contextlib.suppress(CvmError, OSError):
            self.platform = PlatformClient.connect(str(path))
            return
        cmd = [sys.executable, "-m", "cvmotion.agent.platform", "--data-dir", str(self.dir), "--socket", str(path)]
        if self.config.kds_url:
            cmd += ["--kds", self.config.kds_url]
        if self.config.vendor_dir is not None:
            cmd += ["--vendor-dir", str(self.config.vendor_dir)]
        # First-start provisioning is the platform's own (its chip, its pool credential): the daemon only says
        # what the operator asked for; on later starts the platform keeps what it has.
        cmd += ["--product", self.config.product, "--pool", self.config.pool]
        if self.config.pool_ca_dir is not None:
            cmd += ["--pool-ca-dir", str(self.config.pool_ca_dir)]
        log = (self.dir / "platform.log").open("ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + _SPAWN_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = (self.dir / "platform.log").read_text(errors="replace")[-2000:]
                raise UsageError(f"the platform process exited ({proc.returncode}): {tail.strip()}")
            with contextlib.suppress(CvmError, OSError):
                self.platform = PlatformClient.connect(str(path))
                return
            time.sleep(0.05)
        raise UsageError("the platform process did not come up in time")

    def platform_client(self) -> PlatformClient:
        if self.platform is None or self.platform.endpoint.closed:
            self._ensure_platform()
        assert self.platform is not None
        return self.platform

    def _reattach(self) -> None:
        """Find VM processes that outlived a previous daemon, take them over and settle half-done migrations."""
        for record in self.store.load_all():
            spec, persisted = record.spec, record.state
            sock = self.store.vm_dir(spec.name) / "control.sock"
            try:
                record.client = VmClient.connect(spec.name, str(sock), self._vm_calls)
                record.state = VmState.parse(record.client.info()["state"])
            except (CvmError, OSError):
                record.client = None
                record.state = VmState.STOPPED if persisted is VmState.STOPPED else VmState.LOST
            self.vms[spec.name] = record
            self.events.publish("VmReattached", {"vm": spec.name, "state": record.state}, subject=spec.name)
            try:
                if persisted is VmState.INCOMING:
                    self.recovery.resolve_import(record)
                else:
                    # A daemon that died mid-migration left the firmware in an export state: finish it safely.
                    self.recovery.resolve_export(record)
            except CvmError as exc:
                log.exception("VM %s: recovery after restart failed", spec.name)
                self.events.publish("MigrationRecoveryFailed", {"vm": spec.name, "error": str(exc)}, subject=spec.name)

    def _start_listener(self) -> None:
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((self.config.listen_host, self.config.migration_port))
        srv.listen(64)
        srv.settimeout(0.5)
        self._listener = srv
        self.migration_port = srv.getsockname()[1]
        threading.Thread(target=self._accept_loop, name="migration-listener", daemon=True).start()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
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
        self.standby.close()
        if self._listener is not None:
            self._listener.close()

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

    # -- VMs ----------------------------------------------------------------------------------------

    def _vm_calls(self, call: Any) -> Any:
        """Calls from VM processes: guest-message relay (the host carries SNP guest messages)."""
        from cvmotion.ipc.rpc import Reply

        if call.method == "guest_request":
            _, blob, _ = self.platform_client().call("guest_request", {"handle": call.args["handle"]}, call.blob)
            return Reply({}, blob)
        if call.method == "event":
            self.events.publish(str(call.args["type"]), dict(call.args.get("data", {})), subject=call.args.get("vm"))
            return Reply()
        if call.method == "ext_certs":
            return Reply({}, self.platform_client().call("ext_certs")[1])
        raise UsageError(f"unknown call from a VM process: {call.method}")

    def _spawn_vm(self, spec: VmSpec) -> VmClient:
        vm_dir = self.dir / "vms" / spec.name
        vm_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("control.sock", "error", "pid"):
            with contextlib.suppress(FileNotFoundError):
                (vm_dir / stale).unlink()
        (vm_dir / "vm.json").write_text(spec.to_json())
        try:
            warm = self.standby.take(vm_dir)
        except CvmError as exc:
            raise UsageError(f"VM {spec.name!r} failed to start: {exc}") from exc
        if warm is not None:
            warm.name = spec.name
            return warm
        cmd = [sys.executable, "-m", "cvmotion.agent.vm_process", "--dir", str(vm_dir), "--platform"]
        cmd.append(str(self._platform_socket()))
        log = (vm_dir / "vm.log").open("ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + _SPAWN_TIMEOUT
        sock = vm_dir / "control.sock"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                error = (vm_dir / "error").read_text() if (vm_dir / "error").exists() else "see vm.log"
                raise UsageError(f"VM {spec.name!r} failed to start: {error}")
            if sock.exists():
                with contextlib.suppress(OSError, CvmError):
                    return VmClient.connect(spec.name, str(sock), self._vm_calls)
            time.sleep(0.05)
        proc.kill()
        raise UsageError(f"VM {spec.name!r} did not come up within {_SPAWN_TIMEOUT:.0f} s")

    def _save(self, record: VmRecord) -> None:
        self.store.save(record)

    def create_vm(
        self,
        *,
        name: str,
        image: str,
        memory: int,
        vcpus: int = 1,
        cmdline: str = "",
        backend: str | None = None,
        policy: int = DEFAULT_GUEST_POLICY,
        migration_policy: bytes | None = None,
        key_name: str | None = None,
    ) -> VmRecord:
        check_name("VM name", name)
        image_path(image)  # a clear error for a missing image before any process starts
        with self._lock:
            if name in self.vms:
                raise Conflict(f"a VM named {name!r} already exists on host {self.config.name}")
            self._check_memory_budget(memory)
            doc = migration_policy or MigrationPolicy(allowed_pools=(self.config.pool,)).canonical()
            host_data = MigrationPolicy.from_canonical(doc).host_data()
            spec = VmSpec(
                name=name,
                memory=memory,
                vcpus=vcpus,
                image=image,
                cmdline=cmdline,
                backend=backend,
                attestation_url=self.config.attestation_url,
                key_release_url=self.config.key_release_url,
                key_name=key_name,
            )
            record = VmRecord(name=name, spec=spec, policy=policy, migration_policy=base64.b64encode(doc).decode())
            self.vms[name] = record
        try:
            record.client = self._spawn_vm(spec)
            ranges = record.client.call("launch_ranges")[0]
            launched = self.platform_client().call(
                "launch",
                {
                    "vm": name,
                    "policy": policy,
                    "ranges": ranges["ranges"],
                    "host_data": host_data.hex(),
                },
            )[0]
            record.handle = int(launched["handle"])
            record.measurement = str(launched["measurement"])
            record.client.call("bind", {"handle": record.handle})
            record.client.call("start")
            record.state = VmState.RUNNING
            self._save(record)
        except BaseException:
            with self._lock:
                self.vms.pop(name, None)
            if record.client is not None:
                with contextlib.suppress(CvmError):
                    record.client.call("stop")
            raise
        finally:
            self.standby.refill()
        self.events.publish(
            "VmCreated",
            {"vm": name, "image": image, "memory": memory, "measurement": record.measurement, "handle": record.handle},
            subject=name,
        )
        return record

    def _check_memory_budget(self, memory: int) -> None:
        """``Conflict`` when ``memory`` more would exceed ``max_guest_memory`` (the caller holds the lock)."""
        budget = self.config.max_guest_memory
        if budget is None:
            return
        used = sum(r.spec.memory for r in self.vms.values() if r.state not in GONE)
        if used + memory > budget:
            raise Conflict(
                f"host {self.config.name}: {memory} bytes more would exceed its guest memory budget"
                f" ({used} of {budget} bytes in use)"
            )

    def get_vm(self, name: str) -> VmRecord:
        record = self.vms.get(name)
        if record is None:
            raise NotFound(f"no VM named {name!r} on host {self.config.name}")
        return record

    def vm_info(self, record: VmRecord) -> dict[str, Any]:
        live: dict[str, Any] = {}
        if record.client is not None and not record.client.endpoint.closed:
            with contextlib.suppress(CvmError):
                live = record.client.info()
        state = record.state
        if live and record.state in (VmState.RUNNING, VmState.CREATING, VmState.PAUSED):
            state = live.get("state", state)
        return {
            "name": record.name,
            "host": self.config.name,
            "state": state,
            "memory": record.spec.memory,
            "vcpus": record.spec.vcpus,
            "image": record.spec.image,
            "cmdline": record.spec.cmdline,
            "handle": record.handle,
            "measurement": record.measurement,
            "policy": record.policy,
            "backend": live.get("backend", record.spec.backend),
            "pid": live.get("pid"),
            "stop_reason": live.get("stop_reason"),
            "migrations": record.migrations,
        }

    def list_vms(self) -> list[dict[str, Any]]:
        return [self.vm_info(r) for r in list(self.vms.values()) if r.state not in GONE]

    def delete_vm(self, name: str) -> None:
        record = self.get_vm(name)
        if record.client is not None:
            with contextlib.suppress(CvmError):
                record.client.call("stop")
        if record.handle is not None:
            with contextlib.suppress(CvmError):
                self.platform_client().call("decommission", {"handle": record.handle})
        record.state = VmState.DELETED
        self._save(record)
        with self._lock:
            self.vms.pop(name, None)
        self.events.publish("VmDeleted", {"vm": name}, subject=name)

    def kv(self, name: str, op: str, key: bytes, value: bytes = b"", timeout: float = 5.0) -> dict[str, Any]:
        try:
            record = self.get_vm(name)
        except NotFound:
            self._raise_if_moved(name)
            raise
        # A VM being migrated keeps serving I/O until the switchover pauses it (that is the point of live migration).
        if record.client is None or record.state not in (VmState.RUNNING, VmState.MIGRATING):
            self._raise_if_moved(name)  # moved, its record not yet dropped: the client goes where it went
            raise Conflict(f"VM {name!r} is not running here (state: {record.state})")
        try:
            kv_op = KvOp[op.upper()]
        except KeyError:
            raise UsageError(f"unknown kv operation {op!r} (get, put, delete, stats)") from None
        if kv_op not in (KvOp.GET, KvOp.PUT, KvOp.DELETE, KvOp.STATS):
            raise UsageError(f"unknown kv operation {op!r} (get, put, delete, stats)")
        if (kv_op is KvOp.STATS) == bool(key):
            raise UsageError("kv: get, put and delete need a key; stats takes none")
        try:
            _, blob, _ = record.client.call("cvmio", {"timeout": timeout}, encode_request(kv_op, key, value))
        except (DeviceError, RpcError):
            # A request caught by the switchover fails when the source VM stops; once the migration has
            # completed the client is sent to the destination instead of seeing an error. Whether the guest
            # ran it there before the move is unknown, as with any request that got no answer.
            self._wait_for_migration(record, 2.0)
            self._raise_if_moved(name)
            raise
        status, data = decode_response(blob)
        if kv_op is KvOp.STATS and status is KvStatus.OK:
            stats = KvStats.from_bytes(data)
            return {"status": status.name, "keys": stats.keys, "slots": stats.slots, "ops": stats.ops}
        return {"status": status.name, "value": data}

    def _raise_if_moved(self, name: str) -> None:
        location = self.moved.get(name)
        record = self.vms.get(name)
        if location is not None and (record is None or record.state is VmState.MIGRATED):
            raise Moved(f"VM {name!r} was live-migrated to {location}", f"{location}/v1/vms/{name}")

    @staticmethod
    def _wait_for_migration(record: VmRecord, timeout: float) -> None:
        """Until the record's migration (if any) has settled; the lock is held for its whole run."""
        if record.state is VmState.MIGRATING and record.lock.acquire(timeout=timeout):
            record.lock.release()

    def attestation(self, name: str) -> dict[str, Any]:
        """The paravisor's current token and what it says (the token is public: relying parties get it)."""
        record = self.get_vm(name)
        if record.client is None:
            raise Conflict(f"VM {name!r} has no process on this host")
        return dict(record.client.call("attestation")[0])

    def console(self, name: str, since: int = 0) -> dict[str, Any]:
        record = self.get_vm(name)
        if record.client is None:
            raise Conflict(f"VM {name!r} has no process on this host")
        return dict(record.client.call("console", {"since": since})[0])

    # -- migration out ------------------------------------------------------------------------------

    def migrate(self, name: str, destination_url: str, options: MigrationOptions) -> MigrationStats:
        """Start a live migration of ``name`` to the host daemon at ``destination_url``; returns at once."""
        record = self.get_vm(name)
        if record.client is None or record.handle is None or record.state is not VmState.RUNNING:
            raise Conflict(f"VM {name!r} is not running here (state: {record.state})")
        if not record.lock.acquire(blocking=False):
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
                platform=self.platform_client(),
                vm=record.client,
                handle=record.handle,
                policy_doc=base64.b64decode(record.migration_policy),
                destination=dest,
                options=options,
                events=lambda kind, data: self.events.publish(kind, data, subject=name),
                on_finished=lambda st: self._sender_finished(record, st),
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
            self._save(record)
            with self._lock:
                self.migrations[mig_id] = stats
                self.senders[mig_id] = sender
        except BaseException:
            record.lock.release()
            raise
        threading.Thread(target=sender.run, name=f"migrate-{mig_id}", daemon=True).start()
        return stats

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
        return self.peer_client.incoming(url, body)

    def _sender_finished(self, record: VmRecord, stats: MigrationStats) -> None:
        try:
            if stats.status is MigrationStatus.COMPLETED:
                destination = (record.pending_recovery or {}).get("destination")
                if isinstance(destination, str):
                    self.moved[record.name] = destination.rstrip("/")
                record.state = VmState.MIGRATED
                record.pending_recovery = None
                record.client = None
            elif stats.outcome is MigrationOutcome.RESUMED_ON_SOURCE:
                record.state = VmState.RUNNING
                record.pending_recovery = None
            else:
                record.state = VmState.AWAITING_DESTINATION
                self.recovery.start_polling(record)
            self._save(record)
            if record.state is VmState.MIGRATED:
                with self._lock:
                    self.vms.pop(record.name, None)
        finally:
            with contextlib.suppress(RuntimeError):
                record.lock.release()

    # -- migration in -------------------------------------------------------------------------------

    def incoming(self, body: dict[str, Any]) -> dict[str, Any]:
        """A source host's request to receive a VM (``api_schema.IncomingMigration``, validated and authenticated)."""
        name = check_name("VM name", body.get("vm"))
        if body["spec"]["name"] != name:
            raise UsageError(f"spec.name {body['spec']['name']!r} is not the VM {name!r} being migrated")
        with self._lock:
            existing = self.vms.get(name)
            if existing is not None and existing.state not in GONE:
                raise Conflict(f"a VM named {name!r} already exists on host {self.config.name}")
            self._check_memory_budget(int(body["spec"]["memory"]))
        spec_data = dict(body["spec"])
        spec_data["mode"] = "incoming"
        # This host's services, not the source's: the paravisor re-attests where the VM now runs.
        spec_data["attestation_url"] = self.config.attestation_url
        spec_data["key_release_url"] = self.config.key_release_url
        spec = VmSpec(**{k: v for k, v in spec_data.items() if k in VmSpec.__dataclass_fields__})
        options = MigrationOptions.from_json(dict(body.get("options", {})))
        session_id = bytes.fromhex(str(body["session_id"]))
        mig_id = new_migration_id()
        stats = MigrationStats(id=mig_id, vm=name, source=str(body.get("source", "")), destination=self.config.name)
        client = self._spawn_vm(spec)
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
        with self._lock:
            self.vms[name] = record
        self._save(record)
        self.recovery.store.put(mig_id, name, Verdict.IN_PROGRESS)

        def events(kind: str, data: dict[str, Any]) -> None:
            # A verdict is persisted before it is published, so /outcome survives a daemon restart.
            token = receiver.commit_receipt if kind == "MigrationCommitted" else receiver.abort_token
            self.recovery.incoming_event(record, mig_id, kind, data, token)
            self.events.publish(kind, data, subject=name)

        receiver = Receiver(
            stats=stats,
            platform=self.platform_client(),
            vm=client,
            session_id=session_id,
            streams=options.streams,
            options=options,
            events=events,
            on_finished=lambda r: self._receiver_finished(record, r),
        )
        ticket = base64.urlsafe_b64encode(session_id + mig_id.encode()).decode()
        with self._lock:
            self.migrations[mig_id] = stats
            self.receivers[mig_id] = receiver
            self._tickets[ticket] = receiver
        threading.Thread(target=receiver.run, name=f"incoming-{mig_id}", daemon=True).start()
        self.events.publish("MigrationIncoming", {"id": mig_id, "vm": name, "source": stats.source}, subject=name)
        adv_host, adv_port = self.config.listen_host, self.migration_port
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

    def _receiver_finished(self, record: VmRecord, receiver: Receiver) -> None:
        self.standby.refill()  # the host is quiet again: the next VM's process can start now
        if receiver.committed.is_set():
            record.handle = receiver.handle
            record.state = VmState.RUNNING
            self._save(record)
            self.events.publish(
                "VmArrived",
                {"vm": record.name, "handle": record.handle, "migration": receiver.stats.id},
                subject=record.name,
            )
        else:
            record.state = VmState.DELETED
            self._save(record)
            with self._lock:
                if self.vms.get(record.name) is record:
                    del self.vms[record.name]

    def outcome(self, mig_id: str) -> dict[str, Any]:
        """The verdict of an incoming migration, for a source that lost its connection (or its daemon)."""
        receiver = self.receivers.get(mig_id)
        if receiver is not None:
            return receiver.outcome()
        return self.recovery.store.outcome(mig_id)

    def migration(self, mig_id: str) -> MigrationStats:
        stats = self.migrations.get(mig_id)
        if stats is None:
            raise NotFound(f"no migration {mig_id!r} on host {self.config.name}")
        return stats

    def cancel(self, mig_id: str) -> None:
        sender = self.senders.get(mig_id)
        if sender is None:
            raise NotFound(f"no outgoing migration {mig_id!r} on this host")
        sender.cancel.set()
