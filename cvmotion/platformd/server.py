"""platformd: the platform process's server — one per host: the emulated AMD-SP and the host's migration agent (MA).

Trusted (hardware + TEE).  It listens on a Unix socket with two kinds of clients (``platformd.protocol``):

- the host daemon (untrusted): it may send only ``HostCommand``s — the SNP command interface (launch, activate,
  guest-request relay, decommission), the migration commands, whose bundles land in shared rings of ciphertext,
  and the MA relay.  No host command returns plaintext guest memory or key material; the ``ma_*`` firmware calls
  that move keys are made only by the MA inside this process.
- VM processes (hardware): they attach their guest memory (a memfd) and answer the SP's calls.

Each role's enum is its allowlist and each command has one handler in a table (``_host_table``,
``_vm_table``).  Every handler checks the state it acts on inside this process (the hardware it names is
attached and unclaimed, the guest it names is a VM's, the op-state allows it — the firmware's table in
docs/design.md), never what the caller says about it.

Bulk data never goes through the RPC: the daemon shares a ring (memfd) per stream; the SP seals pages
straight from guest memory into it, and opens bundles from a private copy of the ring's bytes (a copy, so a
daemon rewriting the ring while the SP decrypts cannot split what is authenticated from what is written).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import threading
from collections.abc import Callable
from enum import Enum
from pathlib import Path

import numpy as np

from cvmotion.abi.wire import BundleType
from cvmotion.errors import CvmError, FirmwareError, FirmwareStatus, UsageError
from cvmotion.firmware.device import GuestHandle, SecureProcessor
from cvmotion.firmware.launch import PageType
from cvmotion.ipc.rpc import Call, Endpoint, Reply
from cvmotion.platformd.hardware import PAGE, ImportHardware, RemoteHardware, RingMap, check_launch_ranges
from cvmotion.platformd.peer import check_vm_peer
from cvmotion.platformd.protocol import SERVED_INLINE, HostCommand, PlatformIdentity, VmAttached, VmProcessCommand
from cvmotion.platformd.succession import Bindings, RestoredVm, seal_bindings, token_matches
from cvmotion.vmm.loader import SECRETS_PAGE_GPA
from cvmotion.vmm.memory import GuestMemory

__all__ = ["PlatformService"]


Handler = Callable[[Call], Reply]


class _Role(Enum):
    HOST = "host"
    VM = "vm"


class PlatformService:
    """The SP and the MA of one host, behind the RPC surface."""

    def __init__(self, sp: SecureProcessor, *, verify_vm_peers: bool = True) -> None:
        self.sp = sp
        self._lock = threading.Lock()
        self.hardware: dict[str, RemoteHardware] = {}
        self.handles: dict[str, GuestHandle] = {}
        self.imports: dict[str, tuple[int, ImportHardware]] = {}
        self._rings: dict[str, RingMap] = {}
        self.verify_vm_peers = verify_vm_peers
        # Bindings a predecessor sealed with the SP state: each VM's guest, until its VM process re-attaches.
        self._restored: dict[str, RestoredVm] = {}
        self.ma_handle: GuestHandle | None = None  # the MA's own guest context (not the host's to name)
        self.on_sealed: Callable[[], None] = _exit_now
        # Keyed by the enums (str members, so the wire name finds them): each role's table *is* its allowlist.
        self._host_table: dict[str, Handler] = {
            HostCommand.HOST_HELLO: lambda call: Reply(dict(self.identity())),
            HostCommand.STATUS: lambda call: Reply(dict(self.identity())),
            HostCommand.EXT_CERTS: lambda call: Reply({}, self.sp.get_ext_certs().pem()),
            HostCommand.LAUNCH: self._launch,
            HostCommand.GUEST_REQUEST: lambda call: Reply({}, self.sp.guest_request(self._vm_guest(call), call.blob)),
            HostCommand.GUEST_INFO: self._guest_info,
            HostCommand.CAN_RUN: lambda call: Reply({"can_run": self.sp.migration.can_run(self._vm_guest(call))}),
            HostCommand.DECOMMISSION: self._decommission,
            HostCommand.VM_HANDLE: lambda call: Reply({"handle": self.handles.get(str(call.args.get("vm")))}),
            HostCommand.RING_ATTACH: self._ring_attach,
            HostCommand.RING_DETACH: self._ring_detach,
            HostCommand.EXPORT_START: self._export_start,
            HostCommand.EXPORT_IMMUTABLE: self._exported(lambda h, s, c: self.sp.migration.export_immutable(h, s)),
            HostCommand.EXPORT_MEMORY: self._export_memory,
            HostCommand.EXPORT_EPOCH_TOKEN: self._exported(lambda h, s, c: self.sp.migration.export_epoch_token(h, s)),
            HostCommand.EXPORT_PAUSE: lambda call: Reply(
                {}, self.sp.migration.export_pause(self._vm_guest(call)).astype("<u8").tobytes()
            ),
            HostCommand.EXPORT_STATE: self._exported(
                lambda h, s, c: self.sp.migration.export_state(h, s, BundleType[str(c.args.get("kind"))])
            ),
            HostCommand.EXPORT_START_TOKEN: self._exported(lambda h, s, c: self.sp.migration.export_start_token(h, s)),
            HostCommand.EXPORT_FINAL: self._export_final,
            HostCommand.EXPORT_SWITCHOVER: self._export_switchover,
            HostCommand.EXPORT_ABORT: self._on_guest(self.sp.migration.export_abort),
            HostCommand.EXPORT_ABORT_WITH_TOKEN: self._export_abort_with_token,
            HostCommand.EXPORT_FINISH: self._export_finish,
            HostCommand.EXPORT_STATUS: lambda call: Reply(
                {"state": self.sp.migration.export_status(self._vm_guest(call))}
            ),
            HostCommand.IMPORT_BUNDLE: self._import_bundle,
            HostCommand.IMPORT_ABORT: lambda call: Reply({}, self.sp.migration.import_abort(self._import_ref(call)[0])),
            HostCommand.IMPORT_ACTIVATE: self._import_activate,
            HostCommand.IMPORT_COMMIT_RECEIPT: lambda call: Reply(
                {}, self.sp.migration.import_commit_receipt(self._import_ref(call)[0])
            ),
            HostCommand.IMPORT_STATUS: self._import_status,
            HostCommand.IMPORT_DISCARD: self._import_discard,
            HostCommand.MA_SOURCE_BEGIN: self._no_agent,
            HostCommand.MA_DEST_BEGIN: self._no_agent,
            HostCommand.MA_DELIVER: self._no_agent,
            HostCommand.SEAL_STATE: self._seal_state,
        }
        self._vm_table: dict[str, Handler] = {
            VmProcessCommand.VM_DIRTY: self._vm_dirty,
            VmProcessCommand.CAN_RUN: self._vm_can_run,
            VmProcessCommand.VM_DETACH: lambda call: Reply(),  # the hardware goes when its connection closes
        }
        self._agent_missing = "no migration agent was started"

    def serve_agent(self, handlers: dict[HostCommand, Handler] | None, *, reason: str = "") -> None:
        """The MA's handlers for the ``ma_*`` host commands; ``None``: the MA is not configured (``reason``)."""
        if handlers is None:
            self._agent_missing = reason
            return
        for command in (HostCommand.MA_SOURCE_BEGIN, HostCommand.MA_DEST_BEGIN, HostCommand.MA_DELIVER):
            self._host_table[command] = handlers[command]

    def _no_agent(self, call: Call) -> Reply:
        raise UsageError(f"this host's migration agent is not configured: {self._agent_missing}")

    # -- connections --------------------------------------------------------------------------------

    def accept(self, conn: socket.socket) -> Endpoint:
        role: list[_Role] = []

        def handler(call: Call) -> Reply:
            if not role:
                if call.method == VmProcessCommand.VM_ATTACH.value:
                    assert call.endpoint is not None
                    role.append(_Role.VM)  # a connection that tried to attach hardware never becomes a host
                    if self.verify_vm_peers:
                        check_vm_peer(conn, str(call.args.get("name")))
                    return self._vm_attach(call, call.endpoint)
                if call.method == HostCommand.HOST_HELLO.value:
                    role.append(_Role.HOST)
                else:
                    raise UsageError("say host_hello or vm_attach first")
            return self.dispatch(role[0], call)

        return Endpoint(conn, handler, name="platform", inline=SERVED_INLINE)

    def dispatch(self, role: _Role, call: Call) -> Reply:
        """Run ``call`` for a caller of ``role``: only a command of that role's enum has a handler there."""
        table = self._vm_table if role is _Role.VM else self._host_table
        handler = table.get(call.method)
        if handler is None:
            raise UsageError(f"{call.method!r} is not a command this client may send")
        return handler(call)

    def _vm_attach(self, call: Call, endpoint: Endpoint) -> Reply:
        if len(call.fds) != 1:
            raise UsageError("vm_attach needs the guest memfd")
        name = str(call.args["name"])
        memory = GuestMemory(int(call.args["memory"]), fd=call.fds[0], name=f"sp-view-{name}")
        hw = RemoteHardware(name, endpoint, memory)
        reattach = call.args.get("reattach")
        with self._lock:
            old = self.hardware.get(name)
            if old is not None and old.live:
                memory.close()
                raise UsageError(f"VM {name!r} is attached already; its hardware cannot be replaced")
            if reattach is not None:
                self._rebind(name, hw, reattach)
            self.hardware[name] = hw
        if old is not None:
            old.close()
        endpoint.on_close(lambda: self._vm_gone(name, hw))
        # The hardware commands (the VM process serves them inline) go on a lane of the SP's own once the answer is
        # out: the pause, capture and restore inside a switchover then skip both ends' reader hand-offs (ipc.rpc).
        return Reply(dict(VmAttached(token=hw.token.hex())), after=endpoint.open_lane)

    def _rebind(self, name: str, hw: RemoteHardware, token: object) -> None:
        """A VM process re-attaching to this (restarted) platform: its guest back only with its hardware token.

        Its memory served a guest under the previous platform process, so it is claimed whatever happens (a launch
        over it would be a fork and a measurement oracle). Without the token the predecessor sealed for that name,
        it gets no guest: the daemon cannot move a guest to other hardware by naming it. The caller holds the lock.
        """
        hw.claimed = True
        restored = self._restored.get(name)
        if restored is None or not token_matches(restored.token, token):
            return
        del self._restored[name]
        hw.token, hw.claimed, hw.handle = restored.token, restored.claimed, restored.handle

    def adopt(self, bindings: Bindings) -> None:
        """Take over what a predecessor sealed: the VM-to-guest bindings (bound to hardware as VM processes
        re-attach) and the end of its MA's context (this process launched its own)."""
        with self._lock:
            self._restored = dict(bindings.vms)
            for name, vm in bindings.vms.items():
                if vm.handle is not None:
                    self.handles[name] = vm.handle
        if bindings.ma is not None:
            with contextlib.suppress(CvmError):
                self.sp.decommission(bindings.ma)

    def _seal_state(self, call: Call) -> Reply:
        """Seal the SP's state and this process's bindings for the next platform process, then exit."""
        with self._lock:
            vms = dict(self._restored)  # VMs whose process has not re-attached since the last restart carry on
            for name, hw in self.hardware.items():
                if hw.live:
                    vms[name] = RestoredVm(hw.handle, hw.token, hw.claimed)
            bindings = Bindings(vms, self.ma_handle)
        seal_bindings(self.sp, bindings, self.sp.data_dir)
        self.on_sealed()
        return Reply()

    def _vm_can_run(self, call: Call) -> Reply:
        """A VM process asks before its vCPUs run: the answer is for the guest its hardware was bound to, never
        for a handle the (untrusted) daemon told it."""
        bound = next((hw.handle for hw in list(self.hardware.values()) if hw.attached_by(call.endpoint)), None)
        return Reply({"can_run": bound is not None and self.sp.migration.can_run(bound)})

    def _vm_dirty(self, call: Call) -> Reply:
        """A VM process hands the SP a harvest of its dirty log (only for the VM it attached itself)."""
        hw = self.hardware.get(str(call.args.get("name")))
        if hw is None or not hw.attached_by(call.endpoint):
            raise UsageError("vm_dirty: this connection did not attach that VM")
        if len(call.blob) % 8:
            raise UsageError(f"vm_dirty: {len(call.blob)} bytes is not a list of u64 GFNs")
        gfns = np.frombuffer(call.blob, dtype="<u8").astype(np.uint64)
        if len(gfns) and int(gfns.max()) >= hw.gfn_limit:
            raise UsageError("vm_dirty: GFN beyond guest memory")
        hw.add_dirty(gfns)
        return Reply()

    def _vm_gone(self, name: str, hw: RemoteHardware) -> None:
        with self._lock:
            if self.hardware.get(name) is hw:
                del self.hardware[name]
        hw.close()

    def _hw(self, name: str) -> RemoteHardware:
        hw = self.hardware.get(name)
        if hw is None:
            raise UsageError(f"no VM named {name!r} is attached to this platform")
        return hw

    def _ring_map(self, ring: str) -> RingMap:
        entry = self._rings.get(ring)
        if entry is None:
            raise UsageError(f"no ring {ring!r}")
        return entry

    # -- the SNP command interface --------------------------------------------------------------------------

    def identity(self) -> PlatformIdentity:
        status = self.sp.platform_status()
        layout = status.product.tcb_layout
        return PlatformIdentity(
            emulated=status.emulated,
            product=status.product.value,
            chip_id=self.sp.get_id().hex(),
            reported_tcb=status.reported_tcb.to_u64(layout),
            reported_tcb_text=status.reported_tcb.describe(),
            committed_tcb=status.committed_tcb.to_u64(layout),
            api=f"{status.api_major}.{status.api_minor}",
            build=status.build_id,
            guests=status.guest_count,
        )

    def _guest_info(self, call: Call) -> Reply:
        info = self.sp.guest_info(self._vm_guest(call))
        return Reply(
            {
                "state": info.state.name,
                "op_state": info.op_state.name,
                "measurement": info.measurement.hex(),
                "host_data": info.host_data.hex(),
                "policy": info.policy.to_u64(),
            }
        )

    def _decommission(self, call: Call) -> Reply:
        handle = self._vm_guest(call)
        self.sp.decommission(handle)
        self._unbind(handle)
        return Reply()

    def _launch(self, call: Call) -> Reply:
        """SNP launch of an attached VM: START, UPDATE (measured image pages + secrets page), FINISH, ACTIVATE.

        Only on hardware no guest ever had (``claim``): its memory holds nothing but what its VM process loaded,
        so the measured ranges can reveal nothing the host did not write, and the secrets page goes to the one
        GPA the launch defines (``SECRETS_PAGE_GPA``), outside every measured range.
        """
        a = call.args
        name = str(a.get("vm"))
        hw = self._hw(name)
        ranges = check_launch_ranges(a.get("ranges"), hw.gfn_limit)
        try:
            policy = int(a["policy"])
            host_data = bytes.fromhex(str(a.get("host_data", "00" * 32)))
        except (KeyError, TypeError, ValueError):
            raise UsageError("launch needs an integer 'policy' and 'host_data' in hex") from None
        self._claim(hw)
        sp = self.sp
        handle = sp.launch_start(policy)
        try:
            for gpa, length in ranges:
                for page in range(gpa, gpa + length, PAGE):
                    sp.launch_update(handle, page, PageType.NORMAL, hw.memory.view(page, PAGE))
            sp.launch_update(handle, SECRETS_PAGE_GPA, PageType.SECRETS, hw.memory.view(SECRETS_PAGE_GPA, PAGE))
            sp.launch_finish(handle, host_data=host_data)
            sp.activate(handle)
        except BaseException:
            with contextlib.suppress(CvmError):
                sp.decommission(handle)
            raise
        with self._lock:
            self.handles[name] = handle
            hw.handle = handle
        info = sp.guest_info(handle)
        return Reply({"handle": handle, "measurement": info.measurement.hex()})

    def _claim(self, hw: RemoteHardware) -> None:
        with self._lock:
            if hw.claimed:
                raise FirmwareError(
                    FirmwareStatus.INVALID_GUEST_STATE, f"VM {hw.name!r}: its hardware served a guest already"
                )
            hw.claimed = True

    def _unbind(self, handle: GuestHandle) -> None:
        """A guest that no longer exists here is no VM's any more (its hardware stays claimed)."""
        with self._lock:
            for vm in [vm for vm, h in self.handles.items() if h == handle]:
                del self.handles[vm]

    def _vm_guest(self, call: Call) -> GuestHandle:
        """The guest a host command names: only a VM's guest bound here (never the MA's own context)."""
        try:
            handle = GuestHandle(int(call.args["handle"]))
        except (KeyError, TypeError, ValueError):
            raise UsageError("the command needs an integer 'handle'") from None
        with self._lock:
            if handle not in self.handles.values():
                raise FirmwareError(FirmwareStatus.INVALID_GUEST, f"no VM guest with handle {handle}")
        return handle

    # -- rings ---------------------------------------------------------------------------------------------

    def _ring_attach(self, call: Call) -> Reply:
        if len(call.fds) != 1:
            raise UsageError("ring_attach needs the ring memfd")
        fd = call.fds[0]
        try:
            size = os.fstat(fd).st_size
            ring = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        name = str(call.args.get("ring"))
        with self._lock:
            old = self._rings.pop(name, None)
            self._rings[name] = RingMap(ring)
        if old is not None:
            old.close()
        return Reply({"size": size})

    def _ring_detach(self, call: Call) -> Reply:
        with self._lock:
            detached = self._rings.pop(str(call.args.get("ring")), None)
        if detached is not None:
            detached.close()
        return Reply()

    # -- export (source) -----------------------------------------------------------------------------------

    @staticmethod
    def _stream(call: Call) -> int:
        try:
            return int(call.args.get("stream", 0))
        except (TypeError, ValueError):
            raise UsageError("'stream' must be an integer") from None

    def _exported(self, export: Callable[[GuestHandle, int, Call], bytes]) -> Handler:
        """A handler for a command that seals one bundle of the named guest on a stream."""
        return lambda call: Reply({}, export(self._vm_guest(call), self._stream(call), call))

    def _on_guest(self, command: Callable[[GuestHandle], object]) -> Handler:
        """A handler for a command on the named guest that answers nothing."""

        def handler(call: Call) -> Reply:
            command(self._vm_guest(call))
            return Reply()

        return handler

    def _export_start(self, call: Call) -> Reply:
        handle = self._vm_guest(call)
        hw = self._hw(str(call.args.get("vm")))
        if hw.handle != handle:
            # Another VM's memory and vCPUs under this guest's identity: refused (SNP binds them by the RMP).
            raise FirmwareError(FirmwareStatus.INVALID_PARAM, f"VM {hw.name!r} does not run guest {handle}")
        self.sp.migration.export_start(handle, hw)
        return Reply()

    def _export_final(self, call: Call) -> Reply:
        """The stop-and-copy tail in one round trip: vCPU, device and mutable state, then the start token."""
        bundles = self.sp.migration.export_final(self._vm_guest(call), self._stream(call))
        return Reply({"lengths": [len(b) for b in bundles]}, b"".join(bundles))

    def _export_switchover(self, call: Call) -> Reply:
        """The whole stop-and-copy in one round trip (``MigrationFirmware.export_switchover``): the final bundles,
        or, when more pages were left than one bundle holds, those pages (``pending``) for the host to send."""
        handle = self._vm_guest(call)
        done = self.sp.migration.export_switchover(handle, self._stream(call))
        with self._lock:
            hw = next((self.hardware.get(vm) for vm, h in self.handles.items() if h == handle), None)
        result: dict[str, object] = {"paused_at": None if hw is None else hw.paused_at}
        if len(done.pending):
            return Reply(result | {"pending": len(done.pending)}, done.pending.astype("<u8").tobytes())
        return Reply(result | {"lengths": [len(b) for b in done.bundles], "pages": done.pages}, b"".join(done.bundles))

    def _export_abort_with_token(self, call: Call) -> Reply:
        self.sp.migration.export_abort_with_token(self._vm_guest(call), call.blob)
        return Reply()

    def _export_finish(self, call: Call) -> Reply:
        handle = self._vm_guest(call)
        self.sp.migration.export_finish(handle, call.blob)  # the destination's commit receipt, verified by the firmware
        self._unbind(handle)
        return Reply()

    def _export_memory(self, call: Call) -> Reply:
        """Seal one or more bundles into ring slots: ``bundles`` = [[offset, capacity, pages], ...] with the
        GFNs of all of them, in order, in the blob (one round trip for several bundles)."""
        handle, stream = self._vm_guest(call), self._stream(call)
        ring = self._ring_map(str(call.args.get("ring")))
        if len(call.blob) % 8:
            raise UsageError(f"export_memory: {len(call.blob)} bytes is not a list of u64 GFNs")
        gfns = np.frombuffer(call.blob, dtype="<u8").astype(np.uint64)
        try:
            specs = [(int(o), int(c), int(n)) for o, c, n in call.args["bundles"]]
        except (KeyError, TypeError, ValueError):
            raise UsageError("export_memory: 'bundles' is a list of [offset, capacity, pages]") from None
        if sum(n for _, _, n in specs) != len(gfns):
            raise UsageError(f"export_memory: the bundles name {sum(n for _, _, n in specs)} pages, {len(gfns)} given")
        lengths = []
        first = 0
        for offset, capacity, pages in specs:
            out = ring.slice(offset, capacity)
            lengths.append(self.sp.migration.export_memory(handle, stream, gfns[first : first + pages], out))
            first += pages
        return Reply({"lengths": lengths})

    # -- import (destination) --------------------------------------------------------------------------------

    def register_import(self, vm: str, session_id: bytes) -> int:
        """Create the import context for an attached incoming VM (called by the MA session set-up)."""
        remote = self._hw(vm)
        self._claim(remote)
        hw = ImportHardware(remote)
        ref = self.sp.migration.import_prepare(session_id, hw)
        with self._lock:
            self.imports[vm] = (ref, hw)
        return ref

    def _import_ref(self, call: Call) -> tuple[int, ImportHardware]:
        vm = str(call.args.get("vm"))
        entry = self.imports.get(vm)
        if entry is None:
            raise UsageError(f"no import in progress for {vm!r}")
        return entry

    def _import_bundle(self, call: Call) -> Reply:
        ref, hw = self._import_ref(call)
        ring = self._ring_map(str(call.args.get("ring")))
        try:
            spans = [(int(offset), int(length)) for offset, length in call.args["bundles"]]
        except (KeyError, TypeError, ValueError):
            raise UsageError("import_bundle: 'bundles' is a list of [offset, length]") from None
        kinds = [ring.import_bundle(self.sp.migration, ref, offset, length) for offset, length in spans]
        result: dict[str, object] = {"kinds": [k.name for k in kinds]}
        if call.args.get("activate") is not True or not kinds or kinds[-1] is not BundleType.START_TOKEN:
            return Reply(result)
        # The batch committed the import: activate and run the guest in this same host command (a separate
        # import_activate would be one more round trip inside the blackout).  The import stands whatever happens
        # next, so an activation failure is an answer, not an error: the host reports the VM committed, not running.
        try:
            activated, receipt = self._activate(call, ref, hw, run=True)
        except CvmError as exc:
            result["activation_error"] = str(exc) or type(exc).__name__
            return Reply(result, self.sp.migration.import_commit_receipt(ref))
        return Reply(result | activated, receipt)

    def _import_activate(self, call: Call) -> Reply:
        ref, hw = self._import_ref(call)
        result, receipt = self._activate(call, ref, hw, run=False)
        return Reply(result, receipt)

    def _activate(self, call: Call, ref: int, hw: ImportHardware, *, run: bool) -> tuple[dict[str, object], bytes]:
        """Activate a committed import; ``run``: the hardware restores and runs the guest in one round trip."""
        mig = self.sp.migration
        hw.handle = mig.import_handle(ref)
        handle = mig.import_activate(ref, run=run)
        with self._lock:
            hw.remote.handle = handle
            self.handles[str(call.args.get("vm"))] = handle
        result: dict[str, object] = {"handle": handle}
        if run:
            result["resumed_at"] = hw.resumed_at
        return result, mig.import_commit_receipt(ref)

    def _import_status(self, call: Call) -> Reply:
        ref, _ = self._import_ref(call)
        return Reply({"state": self.sp.migration.import_state(ref), "handle": self.sp.migration.import_handle(ref)})

    def _import_discard(self, call: Call) -> Reply:
        ref, _ = self._import_ref(call)
        self.sp.migration.import_discard(ref)
        with self._lock:
            self.imports.pop(str(call.args.get("vm")), None)
        return Reply()

    # -- serving ---------------------------------------------------------------------------------------------

    def serve(self, path: Path, stop: threading.Event, *, listening: Callable[[], None] | None = None) -> None:
        """Serve ``path`` until ``stop``; ``listening`` is called once connections can be made."""
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        os.chmod(path, 0o600)
        server.listen(64)
        server.settimeout(0.2)
        if listening is not None:
            listening()
        endpoints: list[Endpoint] = []
        try:
            while not stop.is_set():
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                endpoints.append(self.accept(conn))
                endpoints = [e for e in endpoints if not e.closed]
        finally:
            server.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            for e in endpoints:
                e.close()


def _exit_now() -> None:
    """After ``seal_state``: the SP refuses everything and its keys are gone; the process has nothing to serve.

    It exits at once, without answering: the host sees the connection close, and its VM processes re-attach to the
    next platform process the moment theirs close.
    """
    os._exit(0)
