"""host layer: the life of a VM on this host — spawn its process, launch it, re-attach it, serve it, delete it.

A VM is a VM process (``python -m cvmotion.vmd``) the daemon starts in its own session, so it outlives the
daemon; a restarted daemon re-attaches through ``vms/<name>/control.sock`` and hands half-done migrations to
``host.recovery``.  Everything here goes through the typed clients of the platform and VM processes.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from cvmotion.abi.images import image_path
from cvmotion.abi.kvstore import KvOp, KvStats, KvStatus, decode_response, encode_request
from cvmotion.agent.policy import MigrationPolicy
from cvmotion.errors import Conflict, CvmError, DeviceError, Moved, NotFound, UsageError
from cvmotion.host.config import DEFAULT_GUEST_POLICY, SPAWN_TIMEOUT
from cvmotion.host.context import HostContext
from cvmotion.host.recovery import Recovery
from cvmotion.host.standby import StandbyPool
from cvmotion.host.store import UNSETTLED, VmRecord, VmState
from cvmotion.ipc.names import check_name
from cvmotion.ipc.rpc import Call, Reply, RpcError
from cvmotion.vmd.client import VmClient
from cvmotion.vmd.protocol import RelayCommand, VmSpec

__all__ = ["VmLifecycle"]

log = logging.getLogger("cvmotion.host")


class VmLifecycle:
    """Create, re-attach, inspect and delete the VMs of one host (thread-safe)."""

    def __init__(
        self,
        context: HostContext,
        standby: StandbyPool,
        recovery: Recovery,
        *,
        on_scheduled_events_post: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self.config, self.store, self.events = context.config, context.store, context.events
        self.platform = context.platform
        self.standby = standby
        self.recovery = recovery
        # What a guest posts to its Scheduled Events mailbox goes to the daemon's store (``host.scheduled_events``).
        self._scheduled_events_post = on_scheduled_events_post

    # -- VM processes --------------------------------------------------------------------------------------

    def relay(self, call: Call) -> Reply:
        """Calls from VM processes (``vmd.protocol.RelayCommand``): the host carries SNP guest messages."""
        if call.method == RelayCommand.GUEST_REQUEST.value:
            return Reply({}, self.platform().guest_request(int(call.args["handle"]), call.blob))
        if call.method == RelayCommand.EVENT.value:
            self.events.publish(str(call.args["type"]), dict(call.args.get("data", {})), subject=call.args.get("vm"))
            return Reply()
        if call.method == RelayCommand.EXT_CERTS.value:
            return Reply({}, self.platform().ext_certs())
        if call.method == RelayCommand.SCHEDULED_EVENTS_POST.value and self._scheduled_events_post is not None:
            self._scheduled_events_post(str(call.args.get("vm")), call.blob)
            return Reply()
        raise UsageError(f"unknown call from a VM process: {call.method}")

    def spawn(self, spec: VmSpec) -> VmClient:
        """A VM process for ``spec``: a warm standby if one is ready, else a new one."""
        vm_dir = self.store.vm_dir(spec.name)
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
        cmd = [sys.executable, "-m", "cvmotion.vmd", "--dir", str(vm_dir), "--platform"]
        cmd.append(str(self.config.data_dir / "platform.sock"))
        log_file = (vm_dir / "vm.log").open("ab")
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=log_file, start_new_session=True)
        deadline = time.monotonic() + SPAWN_TIMEOUT
        sock = vm_dir / "control.sock"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                error = (vm_dir / "error").read_text() if (vm_dir / "error").exists() else "see vm.log"
                raise UsageError(f"VM {spec.name!r} failed to start: {error}")
            if sock.exists():
                with contextlib.suppress(OSError, CvmError):
                    return VmClient.connect(spec.name, str(sock), self.relay)
            time.sleep(0.05)
        proc.kill()
        raise UsageError(f"VM {spec.name!r} did not come up within {SPAWN_TIMEOUT:.0f} s")

    def reattach(self) -> None:
        """Find VM processes that outlived a previous daemon, take them over and settle half-done migrations."""
        for record in self.store.load_all():
            spec, persisted = record.spec, record.state
            sock = self.store.vm_dir(spec.name) / "control.sock"
            try:
                record.client = VmClient.connect(spec.name, str(sock), self.relay)
                record.state = VmState.parse(record.client.info()["state"])
            except (CvmError, OSError):
                record.client = None
                record.state = VmState.STOPPED if persisted is VmState.STOPPED else VmState.LOST
            self.store.add(record)
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

    # -- create ----------------------------------------------------------------------------------------------

    def create(
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
        with self.store.lock:
            if name in self.store.records:
                raise Conflict(f"a VM named {name!r} already exists on host {self.config.name}")
            self.check_memory_budget(memory)
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
            self.store.add(record)
        try:
            record.client = self.spawn(spec)
            ranges = record.client.launch_ranges()
            launched = self.platform().launch(name, policy=policy, ranges=ranges, host_data=host_data)
            record.handle = int(launched["handle"])
            record.measurement = str(launched["measurement"])
            record.client.bind(record.handle)
            record.client.start()
            record.state = VmState.RUNNING
            self.store.save(record)
        except BaseException:
            self.store.forget(record)
            if record.client is not None:
                with contextlib.suppress(CvmError):
                    record.client.stop()
            raise
        finally:
            self.standby.refill()
        self.events.publish(
            "VmCreated",
            {"vm": name, "image": image, "memory": memory, "measurement": record.measurement, "handle": record.handle},
            subject=name,
        )
        return record

    def check_memory_budget(self, memory: int) -> None:
        """``Conflict`` when ``memory`` more would exceed ``max_guest_memory`` (the caller holds the store lock)."""
        budget = self.config.max_guest_memory
        if budget is None:
            return
        used = sum(r.spec.memory for r in self.store.live())
        if used + memory > budget:
            raise Conflict(
                f"host {self.config.name}: {memory} bytes more would exceed its guest memory budget"
                f" ({used} of {budget} bytes in use)"
            )

    # -- inspect -----------------------------------------------------------------------------------------------

    def get(self, name: str) -> VmRecord:
        record = self.store.get(name)
        if record is None:
            raise NotFound(f"no VM named {name!r} on host {self.config.name}")
        return record

    def info(self, record: VmRecord) -> dict[str, Any]:
        live: dict[str, Any] = {}
        if record.client is not None and not record.client.closed:
            with contextlib.suppress(CvmError):
                live = dict(record.client.info())
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

    def attestation(self, name: str) -> dict[str, Any]:
        """The paravisor's current token and what it says (the token is public: relying parties get it)."""
        return dict(self.client(name).attestation())

    def console(self, name: str, since: int = 0) -> dict[str, Any]:
        return dict(self.client(name).console(since))

    def client(self, name: str) -> VmClient:
        record = self.get(name)
        if record.client is None:
            raise Conflict(f"VM {name!r} has no process on this host")
        return record.client

    # -- delete ------------------------------------------------------------------------------------------------

    def delete(self, name: str, *, force: bool = False) -> None:
        """Stop the VM and decommission its guest context.

        A VM whose migration has not settled (migrating, awaiting its destination's verdict, arriving) is refused
        (``Conflict``) unless ``force``: it may be the only copy of the guest, or its other copy may be about to
        run, and only the migration's outcome says which. ``force`` stops it anyway (the operator's call).
        """
        record = self.get(name)
        if force:
            self._delete(record)
            return
        if not record.lock.acquire(blocking=False):  # held for the whole of an outgoing migration
            raise Conflict(f"VM {name!r} is migrating: delete it once the migration settled, or with ?force=true")
        try:
            if record.state in UNSETTLED:
                raise Conflict(
                    f"VM {name!r} is {record.state}: its migration has not settled; delete it once it has,"
                    " or with ?force=true"
                )
            self._delete(record)
        finally:
            record.lock.release()

    def _delete(self, record: VmRecord) -> None:
        if record.client is not None:
            with contextlib.suppress(CvmError):
                record.client.stop()
        if record.handle is not None:
            with contextlib.suppress(CvmError):
                self.platform().decommission(record.handle)
        record.state = VmState.DELETED
        self.store.save(record)
        self.store.forget(record)
        self.events.publish("VmDeleted", {"vm": record.name}, subject=record.name)

    # -- the guest's key-value store (cvm-io) -------------------------------------------------------------------

    def kv(self, name: str, op: str, key: bytes, value: bytes = b"", timeout: float = 5.0) -> dict[str, Any]:
        try:
            record = self.get(name)
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
            blob = record.client.cvmio(encode_request(kv_op, key, value), timeout)
        except (DeviceError, RpcError):
            # A request caught by the switchover fails when the source VM stops; once the migration has
            # completed the client is sent to the destination instead of seeing an error. Whether the guest
            # ran it there before the move is unknown, as with any request that got no answer.
            _wait_for_migration(record, 2.0)
            self._raise_if_moved(name)
            raise
        status, data = decode_response(blob)
        if kv_op is KvOp.STATS and status is KvStatus.OK:
            stats = KvStats.from_bytes(data)
            return {"status": status.name, "keys": stats.keys, "slots": stats.slots, "ops": stats.ops}
        return {"status": status.name, "value": data}

    def _raise_if_moved(self, name: str) -> None:
        location = self.store.moved.get(name)
        record = self.store.get(name)
        if location is not None and (record is None or record.state is VmState.MIGRATED):
            raise Moved(f"VM {name!r} was live-migrated to {location}", f"{location}/v1/vms/{name}")


def _wait_for_migration(record: VmRecord, timeout: float) -> None:
    """Until the record's migration (if any) has settled; the lock is held for its whole run."""
    if record.state is VmState.MIGRATING and record.lock.acquire(timeout=timeout):
        record.lock.release()
