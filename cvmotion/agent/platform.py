"""agent layer: the platform process — one per host: the emulated AMD-SP and the host's migration agent (MA).

Trusted (hardware + TEE).  It listens on a Unix socket with two kinds of clients:

- the host daemon (untrusted): it may call only the *host commands* below — the SNP command interface
  (launch, activate, guest-request relay, decommission) and the migration commands, whose bundles land in
  shared rings of ciphertext.  No host command returns plaintext guest memory or key material; the ``ma_*``
  firmware calls that move keys are made only by the MA inside this process.
- VM processes (hardware): they attach their guest memory (a memfd) and answer the SP's calls.

Bulk data never goes through the RPC: the daemon shares a ring (memfd) per stream; the SP seals pages
straight from guest memory into it, and opens bundles from a private copy of the ring's bytes (a copy, so a
daemon rewriting the ring while the SP decrypts cannot split what is authenticated from what is written).
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cvmotion.abi.gfns import sorted_union
from cvmotion.abi.wire import BundleType
from cvmotion.agent.peer import check_vm_peer
from cvmotion.errors import CvmError, FirmwareError, FirmwareStatus, UsageError
from cvmotion.firmware.device import GuestHandle, SecureProcessor
from cvmotion.firmware.launch import PageType
from cvmotion.firmware.migration import MigrationFirmware
from cvmotion.ipc.rpc import Call, Endpoint, Reply
from cvmotion.vmm.layout import Gpa
from cvmotion.vmm.loader import SECRETS_PAGE_GPA
from cvmotion.vmm.memory import GuestMemory

__all__ = ["HOST_METHODS", "PlatformService", "RemoteHardware", "SpMemory", "main"]

PAGE = 4096
_FOLD_PARTS = 32  # pending dirty harvests kept apart before they are folded into one


class SpMemory:
    """A VM's memfd as the SP maps it: reads through the mapping, writes with ``pwrite``.

    An import writes whole runs of pages into memory the SP has not touched yet; ``pwrite`` lets the kernel
    allocate them without a page-table fault per page (the dominant cost of a write through the mapping).
    """

    def __init__(self, memory: GuestMemory) -> None:
        self._memory = memory
        self.layout = memory.layout

    def view(self, gpa: int, length: int) -> memoryview:
        return self._memory.view(gpa, length)

    def populated_ranges(self) -> list[tuple[Gpa, int]]:
        return self._memory.populated_ranges()

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        offset = self.layout.offset_of(gpa, len(data))
        view = memoryview(data)
        while len(view):
            written = os.pwrite(self._memory.fd, view, offset)
            view, offset = view[written:], offset + written

    def close(self) -> None:
        self._memory.close()


class RemoteHardware:
    """One VM's hardware as the SP sees it: its memory mapped here, the rest through its VM process.

    The VM process hands every harvest of its dirty log to the SP (``vm_dirty``) before the engine sees it,
    so the firmware's fold before each bundle is a local look-up, not a round trip to the VM.
    """

    def __init__(self, name: str, endpoint: Endpoint, memory: GuestMemory) -> None:
        self.name = name
        self._endpoint = endpoint
        self._memory = SpMemory(memory)
        self._gfn_limit = max(r.gpa + r.size for r in memory.layout.regions) >> 12
        self._dirty_lock = threading.Lock()
        self._dirty: list[npt.NDArray[np.uint64]] = []
        # The guest this hardware runs: bound by the SP at launch or import activation, never by the host.
        self.handle: GuestHandle | None = None
        # Hardware serves one guest in its life: claimed by its launch or its import, never released. A second
        # launch over it would be a new guest context over the old guest's memory (a fork, and a measurement
        # oracle over its pages).
        self.claimed = False

    @property
    def memory(self) -> SpMemory:
        return self._memory

    @property
    def live(self) -> bool:
        return not self._endpoint.closed

    @property
    def gfn_limit(self) -> int:
        return self._gfn_limit

    def attached_by(self, endpoint: Endpoint | None) -> bool:
        return endpoint is self._endpoint

    def add_dirty(self, gfns: npt.NDArray[np.uint64]) -> None:
        """A harvest the VM process made for the engine (called from the VM process, before the engine has it).

        Harvests pile up between exports (a daemon may harvest as often as it likes): past ``_FOLD_PARTS`` they are
        folded into one duplicate-free array, so what the SP keeps is bounded by the guest's distinct pages.
        """
        if len(gfns):
            with self._dirty_lock:
                self._dirty.append(gfns)
                if len(self._dirty) > _FOLD_PARTS:
                    self._dirty = [sorted_union(*self._dirty)]

    def take_dirty(self, *, fresh: bool) -> npt.NDArray[np.uint64]:
        parts: list[npt.NDArray[np.uint64]] = []
        if fresh:
            # Harvest the hardware log now (the VM process hands the same pages to the engine's view).
            _, blob, _ = self._endpoint.call("sp_take_dirty", {"fresh": True})
            parts.append(np.frombuffer(blob, dtype="<u8").astype(np.uint64))
        with self._dirty_lock:
            parts += self._dirty
            self._dirty = []
        parts = [p for p in parts if len(p)]
        if not parts:
            return np.zeros(0, dtype=np.uint64)
        return sorted_union(*parts)

    def hold_paused(self) -> None:
        self._endpoint.call("sp_hold_paused")

    def capture_state(self) -> tuple[bytes, bytes]:
        result, blob, _ = self._endpoint.call("sp_capture_state")
        n = int(result["vcpu_len"])
        return blob[:n], blob[n:]

    def restore_state(self, vcpu_state: bytes, device_state: bytes) -> None:
        raise FirmwareError(FirmwareStatus.INVALID_GUEST_STATE, "use restore_with_handle")

    def restore_with_handle(self, handle: int, vcpu_state: bytes, device_state: bytes) -> None:
        self._endpoint.call(
            "sp_restore_state", {"handle": handle, "vcpu_len": len(vcpu_state)}, vcpu_state + device_state
        )

    def close(self) -> None:
        self._memory.close()


class _ImportHardware:
    """The destination's hardware during an import: restore needs the guest handle, known only at commit."""

    def __init__(self, hw: RemoteHardware, service: PlatformService) -> None:
        self._hw = hw
        self._service = service
        self.handle: int | None = None

    @property
    def remote(self) -> RemoteHardware:
        return self._hw

    @property
    def memory(self) -> SpMemory:
        return self._hw.memory

    @property
    def gfn_limit(self) -> int:
        return self._hw.gfn_limit

    def take_dirty(self, *, fresh: bool) -> npt.NDArray[np.uint64]:
        return np.zeros(0, dtype=np.uint64)

    def hold_paused(self) -> None:
        return None

    def capture_state(self) -> tuple[bytes, bytes]:
        raise FirmwareError(FirmwareStatus.INVALID_GUEST_STATE, "an importing VM has no state to capture")

    def restore_state(self, vcpu_state: bytes, device_state: bytes) -> None:
        if self.handle is None:
            raise FirmwareError(FirmwareStatus.INVALID_GUEST_STATE, "import has no guest handle")
        self._hw.restore_with_handle(self.handle, vcpu_state, device_state)


class _RingMap:
    """The SP's mapping of one ring the daemon shares, and the private buffer imports are opened from."""

    def __init__(self, ring: mmap.mmap) -> None:
        self.map = ring
        self.view = memoryview(ring)
        self._private = memoryview(bytearray(0))
        self._lock = threading.Lock()

    def slice(self, offset: int, length: int) -> memoryview:
        if offset < 0 or length < 0 or offset + length > len(self.view):
            raise UsageError(f"ring: {offset:#x}+{length:#x} is outside the ring ({len(self.view):#x} bytes)")
        return self.view[offset : offset + length]

    def import_bundle(self, mig: MigrationFirmware, ref: int, offset: int, length: int) -> BundleType:
        """Copy a bundle out of the shared ring, then open it: the daemon could rewrite the ring while the
        SP decrypts, splitting what is authenticated from what is written.  One buffer per ring, reused;
        the lock keeps two calls on one ring from sharing it."""
        source = self.slice(offset, length)
        with self._lock:
            if len(self._private) < length:
                self._private = memoryview(bytearray(length))
            private = self._private[:length]
            private[:] = source
            return mig.import_bundle(ref, private)

    def close(self) -> None:
        with self._lock, contextlib.suppress(BufferError):  # a view still held elsewhere: the GC unmaps later
            self.view.release()
            self.map.close()


_MAX_LAUNCH_RANGES = 64


def _launch_ranges(raw: Any, gfn_limit: int) -> list[tuple[int, int]]:
    """The host's measured ranges, checked: page-aligned, inside guest memory, bounded, never the secrets page."""
    if not isinstance(raw, list) or not 0 < len(raw) <= _MAX_LAUNCH_RANGES:
        raise FirmwareError(FirmwareStatus.INVALID_PARAM, f"launch needs 1-{_MAX_LAUNCH_RANGES} [gpa, length] ranges")
    ranges = []
    for item in raw:
        if not (isinstance(item, list | tuple) and len(item) == 2 and all(type(x) is int for x in item)):
            raise FirmwareError(FirmwareStatus.INVALID_PARAM, "a launch range is [gpa, length]")
        gpa, length = item
        if gpa < 0 or length <= 0 or gpa % PAGE or length % PAGE or (gpa + length) >> 12 > gfn_limit:
            raise FirmwareError(FirmwareStatus.INVALID_ADDRESS, f"launch range {gpa:#x}+{length:#x} is not guest RAM")
        if gpa < SECRETS_PAGE_GPA + PAGE and gpa + length > SECRETS_PAGE_GPA:
            raise FirmwareError(
                FirmwareStatus.INVALID_ADDRESS, f"launch range {gpa:#x}+{length:#x} covers the secrets page"
            )
        ranges.append((gpa, length))
    return ranges


STATE_ORDER = (BundleType.VCPU_STATE, BundleType.DEVICE_STATE, BundleType.MUTABLE_STATE)

# The commands an untrusted host may send. Everything else (notably every ma_* firmware call) is refused.
HOST_METHODS = frozenset(
    {
        "host_hello",
        "status",
        "ext_certs",
        "launch",
        "guest_request",
        "guest_info",
        "can_run",
        "decommission",
        "ring_attach",
        "ring_detach",
        "export_start",
        "export_immutable",
        "export_memory",
        "export_epoch_token",
        "export_pause",
        "export_state",
        "export_start_token",
        "export_final",
        "export_abort",
        "export_abort_with_token",
        "export_finish",
        "export_status",
        "import_bundle",
        "import_abort",
        "import_activate",
        "import_commit_receipt",
        "import_status",
        "import_discard",
        "vm_handle",
    }
)
_VM_METHODS = frozenset({"vm_attach", "vm_detach", "vm_dirty", "can_run"})


class PlatformService:
    """The SP and the MA of one host, behind the RPC surface."""

    def __init__(self, sp: SecureProcessor, *, verify_vm_peers: bool = True) -> None:
        self.sp = sp
        self._lock = threading.Lock()
        self.hardware: dict[str, RemoteHardware] = {}
        self.handles: dict[str, GuestHandle] = {}
        self.imports: dict[str, tuple[int, _ImportHardware]] = {}
        self._rings: dict[str, _RingMap] = {}
        self.extra_methods: dict[str, Callable[[Call], Reply]] = {}
        self.verify_vm_peers = verify_vm_peers

    # -- connections --------------------------------------------------------------------------------

    def accept(self, conn: socket.socket) -> Endpoint:
        role: dict[str, str] = {}

        def handler(call: Call) -> Reply:
            if not role:
                if call.method == "vm_attach":
                    role["kind"] = "vm"
                elif call.method == "host_hello":
                    role["kind"] = "host"
                else:
                    raise UsageError("say host_hello or vm_attach first")
            allowed = _VM_METHODS if role["kind"] == "vm" else HOST_METHODS | self.extra_methods.keys()
            if call.method not in allowed:
                raise UsageError(f"{call.method!r} is not a command this client may send")
            if call.method == "vm_attach":
                assert call.endpoint is not None
                if self.verify_vm_peers:
                    check_vm_peer(conn, str(call.args.get("name")))
                return self._vm_attach(call, call.endpoint)
            if call.method == "vm_dirty":
                return self._vm_dirty(call)
            if role["kind"] == "vm" and call.method == "can_run":
                return self._vm_can_run(call)
            return self.dispatch(call)

        return Endpoint(conn, handler, name="platform")

    def _vm_attach(self, call: Call, endpoint: Endpoint) -> Reply:
        if len(call.fds) != 1:
            raise UsageError("vm_attach needs the guest memfd")
        name = str(call.args["name"])
        memory = GuestMemory(int(call.args["memory"]), fd=call.fds[0], name=f"sp-view-{name}")
        hw = RemoteHardware(name, endpoint, memory)
        with self._lock:
            old = self.hardware.get(name)
            if old is not None and old.live:
                memory.close()
                raise UsageError(f"VM {name!r} is attached already; its hardware cannot be replaced")
            self.hardware[name] = hw
        if old is not None:
            old.close()
        endpoint.on_close(lambda: self._vm_gone(name, hw))
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

    def _ring_map(self, ring: str) -> _RingMap:
        entry = self._rings.get(ring)
        if entry is None:
            raise UsageError(f"no ring {ring!r}")
        return entry

    def _ring(self, ring: str, offset: int, length: int) -> memoryview:
        return self._ring_map(ring).slice(offset, length)

    # -- commands -----------------------------------------------------------------------------------

    def dispatch(self, call: Call) -> Reply:
        a = call.args
        m = call.method
        sp = self.sp
        mig = sp.migration
        extra = self.extra_methods.get(m)
        if extra is not None:
            return extra(call)
        if m == "host_hello":
            return Reply(self.identity())
        if m == "status":
            return Reply(self.identity())
        if m == "ext_certs":
            return Reply({}, sp.get_ext_certs().pem())
        if m == "launch":
            return Reply(self._launch(a))
        if m == "guest_request":
            return Reply({}, sp.guest_request(self._vm_guest(a), call.blob))
        if m == "guest_info":
            info = sp.guest_info(self._vm_guest(a))
            return Reply(
                {
                    "state": info.state.name,
                    "op_state": info.op_state.name,
                    "measurement": info.measurement.hex(),
                    "host_data": info.host_data.hex(),
                    "policy": info.policy.to_u64(),
                }
            )
        if m == "can_run":
            return Reply({"can_run": mig.can_run(self._vm_guest(a))})
        if m == "decommission":
            handle = self._vm_guest(a)
            sp.decommission(handle)
            self._unbind(handle)
            return Reply()
        if m == "vm_handle":
            return Reply({"handle": self.handles.get(str(a["vm"]))})
        if m == "ring_attach":
            return self._ring_attach(call)
        if m == "ring_detach":
            with self._lock:
                detached = self._rings.pop(str(a["ring"]), None)
            if detached is not None:
                detached.close()
            return Reply()
        if m.startswith("export_"):
            return self._export(m, a, call.blob)
        if m.startswith("import_"):
            return self._import(m, a)
        raise UsageError(f"unknown platform command {m!r}")

    def identity(self) -> dict[str, Any]:
        status = self.sp.platform_status()
        layout = status.product.tcb_layout
        return {
            "emulated": status.emulated,
            "product": status.product.value,
            "chip_id": self.sp.get_id().hex(),
            "reported_tcb": status.reported_tcb.to_u64(layout),
            "reported_tcb_text": status.reported_tcb.describe(),
            "committed_tcb": status.committed_tcb.to_u64(layout),
            "api": f"{status.api_major}.{status.api_minor}",
            "build": status.build_id,
            "guests": status.guest_count,
        }

    def _launch(self, a: dict[str, Any]) -> dict[str, Any]:
        """SNP launch of an attached VM: START, UPDATE (measured image pages + secrets page), FINISH, ACTIVATE.

        Only on hardware no guest ever had (``claim``): its memory holds nothing but what its VM process loaded,
        so the measured ranges can reveal nothing the host did not write, and the secrets page goes to the one
        GPA the launch defines (``SECRETS_PAGE_GPA``), outside every measured range.
        """
        name = str(a["vm"])
        hw = self._hw(name)
        ranges = _launch_ranges(a.get("ranges"), hw.gfn_limit)
        self._claim(hw)
        sp = self.sp
        handle = sp.launch_start(int(a["policy"]))
        try:
            for gpa, length in ranges:
                for page in range(gpa, gpa + length, PAGE):
                    sp.launch_update(handle, page, PageType.NORMAL, hw.memory.view(page, PAGE))
            sp.launch_update(handle, SECRETS_PAGE_GPA, PageType.SECRETS, hw.memory.view(SECRETS_PAGE_GPA, PAGE))
            sp.launch_finish(handle, host_data=bytes.fromhex(str(a.get("host_data", "00" * 32))))
            sp.activate(handle)
        except BaseException:
            with contextlib.suppress(CvmError):
                sp.decommission(handle)
            raise
        with self._lock:
            self.handles[name] = handle
            hw.handle = handle
        info = sp.guest_info(handle)
        return {"handle": handle, "measurement": info.measurement.hex()}

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

    def _vm_guest(self, a: dict[str, Any]) -> GuestHandle:
        """The guest a host command names: only a VM's guest bound here (never the MA's own context)."""
        try:
            handle = GuestHandle(int(a["handle"]))
        except (KeyError, TypeError, ValueError):
            raise UsageError("the command needs an integer 'handle'") from None
        with self._lock:
            if handle not in self.handles.values():
                raise FirmwareError(FirmwareStatus.INVALID_GUEST, f"no VM guest with handle {handle}")
        return handle

    def _ring_attach(self, call: Call) -> Reply:
        if len(call.fds) != 1:
            raise UsageError("ring_attach needs the ring memfd")
        fd = call.fds[0]
        try:
            size = os.fstat(fd).st_size
            ring = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        name = str(call.args["ring"])
        with self._lock:
            old = self._rings.pop(name, None)
            self._rings[name] = _RingMap(ring)
        if old is not None:
            old.close()
        return Reply({"size": size})

    def _export(self, m: str, a: dict[str, Any], blob: bytes) -> Reply:
        mig = self.sp.migration
        handle = self._vm_guest(a)
        stream = int(a.get("stream", 0))
        if m == "export_start":
            hw = self._hw(str(a["vm"]))
            if hw.handle != handle:
                # Another VM's memory and vCPUs under this guest's identity: refused (SNP binds them by the RMP).
                raise FirmwareError(FirmwareStatus.INVALID_PARAM, f"VM {hw.name!r} does not run guest {handle}")
            mig.export_start(handle, hw)
            return Reply()
        if m == "export_immutable":
            return Reply({}, mig.export_immutable(handle, stream))
        if m == "export_memory":
            return Reply({"lengths": self._export_memory(handle, stream, a, blob)})
        if m == "export_epoch_token":
            return Reply({}, mig.export_epoch_token(handle, stream))
        if m == "export_pause":
            mig.export_pause(handle)
            return Reply()
        if m == "export_state":
            return Reply({}, mig.export_state(handle, stream, BundleType[str(a["kind"])]))
        if m == "export_start_token":
            return Reply({}, mig.export_start_token(handle, stream))
        if m == "export_final":
            # The stop-and-copy tail in one round trip: vCPU, device and mutable state, then the start token.
            bundles = [mig.export_state(handle, stream, kind) for kind in STATE_ORDER]
            bundles.append(mig.export_start_token(handle, stream))
            return Reply({"lengths": [len(b) for b in bundles]}, b"".join(bundles))
        if m == "export_abort":
            mig.export_abort(handle)
            return Reply()
        if m == "export_abort_with_token":
            mig.export_abort_with_token(handle, blob)
            return Reply()
        if m == "export_finish":
            mig.export_finish(handle, blob)  # the destination's commit receipt, verified by the firmware
            self._unbind(handle)
            return Reply()
        if m == "export_status":
            return Reply({"state": mig.export_status(handle)})
        raise UsageError(f"unknown export command {m!r}")

    def _export_memory(self, handle: GuestHandle, stream: int, a: dict[str, Any], blob: bytes) -> list[int]:
        """Seal one or more bundles into ring slots: ``bundles`` = [[offset, capacity, pages], ...] with the
        GFNs of all of them, in order, in the blob (one round trip for several bundles)."""
        ring = self._ring_map(str(a["ring"]))
        gfns = np.frombuffer(blob, dtype="<u8").astype(np.uint64)
        specs = [(int(o), int(c), int(n)) for o, c, n in a["bundles"]]
        if sum(n for _, _, n in specs) != len(gfns):
            raise UsageError(f"export_memory: the bundles name {sum(n for _, _, n in specs)} pages, {len(gfns)} given")
        lengths = []
        first = 0
        for offset, capacity, pages in specs:
            out = ring.slice(offset, capacity)
            lengths.append(self.sp.migration.export_memory(handle, stream, gfns[first : first + pages], out))
            first += pages
        return lengths

    def register_import(self, vm: str, session_id: bytes) -> int:
        """Create the import context for an attached incoming VM (called by the MA session set-up)."""
        remote = self._hw(vm)
        self._claim(remote)
        hw = _ImportHardware(remote, self)
        ref = self.sp.migration.import_prepare(session_id, hw)
        with self._lock:
            self.imports[vm] = (ref, hw)
        return ref

    def _import_ref(self, vm: str) -> tuple[int, _ImportHardware]:
        entry = self.imports.get(vm)
        if entry is None:
            raise UsageError(f"no import in progress for {vm!r}")
        return entry

    def _import(self, m: str, a: dict[str, Any]) -> Reply:
        mig = self.sp.migration
        vm = str(a["vm"])
        ref, hw = self._import_ref(vm)
        if m == "import_bundle":
            ring = self._ring_map(str(a["ring"]))
            kinds = [ring.import_bundle(mig, ref, int(offset), int(length)) for offset, length in a["bundles"]]
            return Reply({"kinds": [k.name for k in kinds]})
        if m == "import_abort":
            return Reply({}, mig.import_abort(ref))
        if m == "import_activate":
            hw.handle = mig.import_handle(ref)
            handle = mig.import_activate(ref)
            with self._lock:
                hw.remote.handle = handle
                self.handles[vm] = handle
            return Reply({"handle": handle}, mig.import_commit_receipt(ref))
        if m == "import_commit_receipt":
            return Reply({}, mig.import_commit_receipt(ref))
        if m == "import_status":
            return Reply({"state": mig.import_state(ref), "handle": mig.import_handle(ref)})
        if m == "import_discard":
            mig.import_discard(ref)
            with self._lock:
                self.imports.pop(vm, None)
            return Reply()
        raise UsageError(f"unknown import command {m!r}")

    # -- serving ------------------------------------------------------------------------------------

    def serve(self, path: Path, stop: threading.Event) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        os.chmod(path, 0o600)
        server.listen(64)
        server.settimeout(0.2)
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


def main(argv: list[str] | None = None) -> int:
    from cvmotion.agent.provision import provision

    parser = argparse.ArgumentParser(prog="cvmotion-platform", description="a host's emulated AMD-SP and MA")
    parser.add_argument("--data-dir", required=True, type=Path, help="the host's data directory (chip identity)")
    parser.add_argument("--socket", required=True, type=Path)
    parser.add_argument("--vendor-dir", type=Path, help="emulated vendor (for VCEK certificates)")
    parser.add_argument("--kds", help="KDS URL for VCEK certificates (instead of --vendor-dir)")
    parser.add_argument("--product", help="first start: the chip to manufacture (Milan, Genoa, Turin)")
    parser.add_argument("--pool", help="first start: the pool the operator's pool CA puts this chip in")
    parser.add_argument("--pool-ca-dir", type=Path, help="first start: the operator's pool CA (issues the credential)")
    args = parser.parse_args(argv)
    try:
        provision(
            args.data_dir,
            product=args.product,
            vendor_dir=args.vendor_dir,
            pool=args.pool,
            pool_ca_dir=args.pool_ca_dir,
        )
        service = build_service(args.data_dir, vendor_dir=args.vendor_dir, kds_url=args.kds)
    except CvmError as exc:
        print(f"cvmotion-platform: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    (args.data_dir / "platform.pid").write_text(str(os.getpid()))
    service.serve(args.socket, stop)
    return 0


def build_service(data_dir: Path, *, vendor_dir: Path | None, kds_url: str | None) -> PlatformService:
    """Open the host's chip, bring up its SP and its migration agent (MA)."""
    from cvmotion.agent.platform_ma import MigrationAgentService, load_agent_config
    from cvmotion.agent.provision import platform_trust
    from cvmotion.firmware.chip import Chip
    from cvmotion.firmware.kds import Kds
    from cvmotion.firmware.kds_http import KdsClient
    from cvmotion.firmware.vendor import Vendor

    endorsements: Any
    if kds_url:
        endorsements = KdsClient(kds_url)
    elif vendor_dir is not None:
        endorsements = Kds(Vendor.open(vendor_dir))
    else:
        raise UsageError("the platform needs --kds URL or --vendor-dir for VCEK certificates")
    sp = SecureProcessor.open(data_dir, endorsements=endorsements)
    service = PlatformService(sp)
    # Real AMD roots are pinned; the emulated ARK recorded when the chip was made is the only other anchor (a
    # migration never leaves the product family), never one the KDS or vendor directory of this start offers.
    trust = platform_trust(data_dir, Chip.load(data_dir))
    try:
        MigrationAgentService(service, load_agent_config(data_dir, trust))
    except UsageError as exc:
        reason = str(exc)

        def refuse(call: Call) -> Reply:
            raise UsageError(f"this host's migration agent is not configured: {reason}")

        service.extra_methods.update({"ma_source_begin": refuse, "ma_dest_begin": refuse, "ma_deliver": refuse})
    return service


if __name__ == "__main__":
    raise SystemExit(main())
