"""platformd: typed clients of the platform process's protocol (``platformd.protocol``), one method per command.

``PlatformClient`` is the host daemon's (and its migration engine's) handle: what comes back is exactly what the
host may see — ciphertext bundles, tokens MAC'd under keys it does not hold, page numbers, public identity.
``VmPlatformClient`` is a VM process's (attach its memory, feed the SP's dirty view, ask whether it may run).
``Ring`` is the shared memory bundles travel through.  Nothing else sends these commands.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from cvmotion.abi.wire import bundle_capacity
from cvmotion.errors import ProtocolError
from cvmotion.ipc.rpc import ChannelClosed, Endpoint, Handler, connect_unix
from cvmotion.platformd.protocol import (
    ExportArgs,
    ExportMemoryArgs,
    ExportStartArgs,
    ExportStateArgs,
    GuestInfo,
    HandleArgs,
    HostCommand,
    ImportArgs,
    ImportBundleArgs,
    ImportStatus,
    LaunchArgs,
    LaunchResult,
    MaDeliverArgs,
    MaDestBeginArgs,
    MaReport,
    MaSourceBeginArgs,
    PlatformIdentity,
    RingArgs,
    VmAttachArgs,
    VmAttached,
    VmDirtyArgs,
    VmHandleArgs,
    VmProcessCommand,
)

__all__ = ["GFN_DTYPE", "Committed", "PlatformClient", "Ring", "Switchover", "VmPlatformClient"]

GFN_DTYPE = "<u8"


class Ring:
    """Shared memory (a memfd) into which the SP seals bundles and from which the SP opens them."""

    def __init__(self, name: str, slots: int, pages_per_bundle: int) -> None:
        self.name = name
        self.slot_size = (bundle_capacity(pages_per_bundle) + 4095) & ~4095
        self.slots = slots
        self.fd = os.memfd_create(f"cvmotion-ring-{name}", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.slot_size * slots)
        self._map = mmap.mmap(self.fd, self.slot_size * slots, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self._map)

    def slot(self, index: int) -> memoryview:
        return self.view[index * self.slot_size : (index + 1) * self.slot_size]

    def offset(self, index: int) -> int:
        return index * self.slot_size

    def close(self) -> None:
        self.view.release()
        self._map.close()
        os.close(self.fd)


def _split(lengths: list[Any], blob: bytes, what: str) -> list[bytes]:
    out, offset = [], 0
    for length in lengths:
        out.append(blob[offset : offset + int(length)])
        offset += int(length)
    if offset != len(blob):
        raise ProtocolError(f"{what}: {len(blob)} bytes for bundles of {offset}")
    return out


@dataclass(frozen=True, slots=True)
class Switchover:
    """``export_switchover``'s answer: the final bundles and the pages in them, or the ``pending`` pages; and
    ``paused_at``, the Unix time the VM process stopped the vCPUs (None if it did not say)."""

    bundles: list[bytes] = field(default_factory=list)
    pages: int = 0
    pending: npt.NDArray[np.uint64] = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    paused_at: float | None = None


@dataclass(frozen=True, slots=True)
class Committed:
    """``import_and_activate``'s answer: the commit receipt, and the guest's handle and the Unix time its vCPUs
    ran, or why activation failed (the import is committed either way)."""

    receipt: bytes
    handle: int | None = None
    resumed_at: float | None = None
    error: str | None = None


@dataclass
class PlatformClient:
    """The host's view of its platform process (secure processor + migration agent)."""

    endpoint: Endpoint

    @classmethod
    def connect(cls, path: str) -> PlatformClient:
        client = cls(connect_unix(path, name="host->platform"))
        client._call(HostCommand.HOST_HELLO)
        # The commands the platform serves inline (the switchover's, the imports') go on a lane of this client's
        # own when free: no reader hand-off on either side (ipc.rpc). A platform without lanes keeps them here.
        client.endpoint.open_lane()
        return client

    @property
    def closed(self) -> bool:
        return self.endpoint.closed

    def _call(
        self, command: HostCommand, args: Any = None, blob: bytes | memoryview = b"", fds: tuple[int, ...] = ()
    ) -> tuple[dict[str, Any], bytes]:
        result, data, _ = self.endpoint.call(command.value, dict(args or {}), blob, fds=fds)
        return result, data

    # -- the SNP command interface ------------------------------------------------------------------------

    def identity(self) -> PlatformIdentity:
        return cast(PlatformIdentity, self._call(HostCommand.STATUS)[0])

    def ext_certs(self) -> bytes:
        """The VCEK chain (PEM) guests fetch through the host (SNP extended guest request)."""
        return self._call(HostCommand.EXT_CERTS)[1]

    def launch(self, vm: str, *, policy: int, ranges: list[tuple[int, int]], host_data: bytes) -> LaunchResult:
        """SNP launch of an attached VM whose hardware never served a guest: START, UPDATE, FINISH, ACTIVATE."""
        args = LaunchArgs(vm=vm, policy=policy, ranges=[list(r) for r in ranges], host_data=host_data.hex())
        return cast(LaunchResult, self._call(HostCommand.LAUNCH, args)[0])

    def guest_request(self, handle: int, message: bytes) -> bytes:
        """Relay one SNP guest message (AES-GCM under a VMPCK: opaque to the host); returns the response."""
        return self._call(HostCommand.GUEST_REQUEST, HandleArgs(handle=handle), message)[1]

    def guest_info(self, handle: int) -> GuestInfo:
        return cast(GuestInfo, self._call(HostCommand.GUEST_INFO, HandleArgs(handle=handle))[0])

    def can_run(self, handle: int) -> bool:
        return bool(self._call(HostCommand.CAN_RUN, HandleArgs(handle=handle))[0]["can_run"])

    def decommission(self, handle: int) -> None:
        self._call(HostCommand.DECOMMISSION, HandleArgs(handle=handle))

    def vm_handle(self, vm: str) -> int | None:
        handle = self._call(HostCommand.VM_HANDLE, VmHandleArgs(vm=vm))[0]["handle"]
        return None if handle is None else int(handle)

    def seal_state(self, timeout: float = 60.0) -> None:
        """Have the SP seal its state for the next platform process; this one exits (its answer is that exit).

        Raises the platform's refusal (an import in flight, a launch half done) as it comes; a connection that
        closes is the platform gone after sealing.
        """
        try:
            self.endpoint.call(HostCommand.SEAL_STATE.value, {}, timeout=timeout)
        except ChannelClosed:
            return
        raise ProtocolError("the platform answered seal_state and did not exit")

    # -- rings ------------------------------------------------------------------------------------------

    def attach_ring(self, ring: Ring) -> None:
        self._call(HostCommand.RING_ATTACH, RingArgs(ring=ring.name), fds=(ring.fd,))

    def detach_ring(self, ring: Ring) -> None:
        self._call(HostCommand.RING_DETACH, RingArgs(ring=ring.name))

    # -- export (source) ----------------------------------------------------------------------------------

    def export_start(self, handle: int, vm: str) -> None:
        self._call(HostCommand.EXPORT_START, ExportStartArgs(handle=handle, vm=vm))

    def export_immutable(self, handle: int, stream: int = 0) -> bytes:
        return self._call(HostCommand.EXPORT_IMMUTABLE, ExportArgs(handle=handle, stream=stream))[1]

    def export_memory(self, handle: int, stream: int, gfns: npt.NDArray[np.uint64], ring: Ring, slot: int) -> int:
        """Seal ``gfns`` (one bundle) into ``slot`` of ``ring``; returns the bundle's length."""
        return self.export_memory_batch(handle, stream, [gfns], ring, [slot])[0]

    def export_memory_batch(
        self, handle: int, stream: int, batches: list[npt.NDArray[np.uint64]], ring: Ring, slots: list[int]
    ) -> list[int]:
        """Seal several bundles (one GFN array each) into ring slots in one round trip; returns their lengths."""
        bundles = [[ring.offset(slot), ring.slot_size, len(g)] for g, slot in zip(batches, slots, strict=True)]
        blob = (
            np.concatenate(batches).astype(GFN_DTYPE).tobytes()
            if len(batches) > 1
            else batches[0].astype(GFN_DTYPE).tobytes()
        )
        args = ExportMemoryArgs(handle=handle, stream=stream, ring=ring.name, bundles=bundles)
        return [int(n) for n in self._call(HostCommand.EXPORT_MEMORY, args, blob)[0]["lengths"]]

    def export_epoch_token(self, handle: int, stream: int = 0) -> bytes:
        return self._call(HostCommand.EXPORT_EPOCH_TOKEN, ExportArgs(handle=handle, stream=stream))[1]

    def export_pause(self, handle: int) -> npt.NDArray[np.uint64]:
        """The firmware holds the paused VM; returns the pages dirtied since the last harvest (the last to send)."""
        blob = self._call(HostCommand.EXPORT_PAUSE, HandleArgs(handle=handle))[1]
        if len(blob) % 8:
            raise ProtocolError(f"export_pause: a GFN list of {len(blob)} bytes")
        return np.frombuffer(blob, dtype="<u8").astype(np.uint64)

    def export_state(self, handle: int, stream: int, kind: str) -> bytes:
        return self._call(HostCommand.EXPORT_STATE, ExportStateArgs(handle=handle, stream=stream, kind=kind))[1]

    def export_start_token(self, handle: int, stream: int = 0) -> bytes:
        return self._call(HostCommand.EXPORT_START_TOKEN, ExportArgs(handle=handle, stream=stream))[1]

    def export_final(self, handle: int, stream: int = 0) -> list[bytes]:
        """The state bundles (vCPU, device, mutable) and the start token, sealed in one round trip."""
        result, blob = self._call(HostCommand.EXPORT_FINAL, ExportArgs(handle=handle, stream=stream))
        return _split(list(result["lengths"]), blob, "export_final")

    def export_switchover(self, handle: int, stream: int = 0) -> Switchover:
        """The whole stop-and-copy in one round trip: the firmware pauses and holds the VM and seals the last pages,
        the state and the start token; or, when more pages were left than it seals in one answer, names them."""
        result, blob = self._call(HostCommand.EXPORT_SWITCHOVER, ExportArgs(handle=handle, stream=stream))
        paused = result.get("paused_at")
        paused_at = float(paused) if isinstance(paused, int | float) else None
        if result.get("pending"):
            if len(blob) % 8:
                raise ProtocolError(f"export_switchover: a GFN list of {len(blob)} bytes")
            return Switchover(pending=np.frombuffer(blob, dtype="<u8").astype(np.uint64), paused_at=paused_at)
        bundles = _split(list(result["lengths"]), blob, "export_switchover")
        return Switchover(bundles=bundles, pages=int(result["pages"]), paused_at=paused_at)

    def export_abort(self, handle: int) -> None:
        self._call(HostCommand.EXPORT_ABORT, HandleArgs(handle=handle))

    def export_abort_with_token(self, handle: int, token: bytes) -> None:
        """Resume a frozen export with the destination's abort token (verified by the firmware under K_b)."""
        self._call(HostCommand.EXPORT_ABORT_WITH_TOKEN, HandleArgs(handle=handle), token)

    def export_finish(self, handle: int, receipt: bytes) -> None:
        """Decommission the source, only on the destination's commit receipt (verified by the firmware)."""
        self._call(HostCommand.EXPORT_FINISH, HandleArgs(handle=handle), receipt)

    def export_status(self, handle: int) -> str:
        """The export op-state's name."""
        return str(self._call(HostCommand.EXPORT_STATUS, HandleArgs(handle=handle))[0]["state"])

    # -- import (destination) -----------------------------------------------------------------------------

    def import_bundle(self, vm: str, ring: Ring, slot: int, length: int) -> str:
        """Hand one bundle in ``slot`` of ``ring`` to the firmware; returns its type's name."""
        return self.import_bundles(vm, ring, [(ring.offset(slot), length)])[0]

    def import_bundles(self, vm: str, ring: Ring, bundles: list[tuple[int, int]]) -> list[str]:
        """Hand several bundles, ``(ring offset, length)`` each and in stream order, to the firmware in one
        round trip; returns their types' names.  The first that fails raises (the import is FAILED then)."""
        args = ImportBundleArgs(vm=vm, ring=ring.name, bundles=[list(b) for b in bundles])
        return [str(k) for k in self._call(HostCommand.IMPORT_BUNDLE, args)[0]["kinds"]]

    def import_and_activate(self, vm: str, ring: Ring, bundles: list[tuple[int, int]]) -> Committed:
        """``import_bundles`` of a batch that ends with the start token, and, once it commits, the guest activated
        and run in the same round trip.  An import failure raises; an activation failure after the commit is in
        the answer (``activation_error``), with the commit receipt."""
        args = ImportBundleArgs(vm=vm, ring=ring.name, bundles=[list(b) for b in bundles], activate=True)
        result, receipt = self._call(HostCommand.IMPORT_BUNDLE, args)
        kinds = [str(k) for k in result["kinds"]]
        if not kinds or kinds[-1] != "START_TOKEN":
            raise ProtocolError(f"import_and_activate: the batch ended with {kinds[-1:]}, not the start token")
        error = result.get("activation_error")
        if error is not None:
            return Committed(receipt, error=str(error))
        return Committed(receipt, handle=int(result["handle"]), resumed_at=float(result["resumed_at"]))

    def import_abort(self, vm: str) -> bytes:
        """Fail the import; returns the abort token for the source (MAC'd under K_b)."""
        return self._call(HostCommand.IMPORT_ABORT, ImportArgs(vm=vm))[1]

    def import_activate(self, vm: str) -> tuple[int, bytes]:
        """Activate a committed import; returns (the guest's handle, the commit receipt for the source)."""
        result, receipt = self._call(HostCommand.IMPORT_ACTIVATE, ImportArgs(vm=vm))
        return int(result["handle"]), receipt

    def import_commit_receipt(self, vm: str) -> bytes:
        return self._call(HostCommand.IMPORT_COMMIT_RECEIPT, ImportArgs(vm=vm))[1]

    def import_status(self, vm: str) -> ImportStatus:
        return cast(ImportStatus, self._call(HostCommand.IMPORT_STATUS, ImportArgs(vm=vm))[0])

    def import_discard(self, vm: str) -> None:
        self._call(HostCommand.IMPORT_DISCARD, ImportArgs(vm=vm))

    # -- the migration agent (frames relayed, never keys) ---------------------------------------------------

    def ma_source_begin(self, vm: str, handle: int, session_id: bytes, policy_doc: bytes) -> MaReport:
        args = MaSourceBeginArgs(vm=vm, handle=handle, session_id=session_id.hex())
        return cast(MaReport, self._call(HostCommand.MA_SOURCE_BEGIN, args, policy_doc)[0])

    def ma_dest_begin(self, vm: str, session_id: bytes) -> MaReport:
        args = MaDestBeginArgs(vm=vm, session_id=session_id.hex())
        return cast(MaReport, self._call(HostCommand.MA_DEST_BEGIN, args)[0])

    def ma_deliver(self, session_id: bytes, role: str, frame: bytes) -> MaReport:
        args = MaDeliverArgs(session_id=session_id.hex(), role=role)
        return cast(MaReport, self._call(HostCommand.MA_DELIVER, args, frame)[0])

    def close(self) -> None:
        self.endpoint.close()


class VmPlatformClient:
    """A VM process's connection to its platform process; the platform serves the hardware's calls on it."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    @classmethod
    def connect(
        cls, path: str, handler: Handler, *, name: str, inline: frozenset[str] = frozenset()
    ) -> VmPlatformClient:
        """``inline``: the hardware commands the connection's reader serves itself (``ipc.rpc``)."""
        return cls(connect_unix(path, handler, name=name, inline=inline))

    def attach(self, name: str, memory: int, mode: str, memfd: int, *, reattach: bytes | None = None) -> bytes:
        """Hand the platform this VM's guest memory (the SP reads and writes it directly, as the real one does).

        Returns the hardware token this platform gave; ``reattach``: the token of the previous platform process
        (this process is the hardware its guest ran on, attaching to the platform that replaced it).
        """
        args = VmAttachArgs(name=name, memory=memory, mode=mode)
        if reattach is not None:
            args["reattach"] = reattach.hex()
        result, _, _ = self.endpoint.call(VmProcessCommand.VM_ATTACH.value, dict(args), fds=[memfd])
        try:
            return bytes.fromhex(str(cast(VmAttached, result)["token"]))
        except (KeyError, ValueError) as exc:
            raise ProtocolError("vm_attach: the platform gave no hardware token") from exc

    def dirty(self, name: str, gfns: npt.NDArray[np.uint64]) -> None:
        """A harvest of the dirty log, for the SP's view."""
        self.endpoint.call(
            VmProcessCommand.VM_DIRTY.value, dict(VmDirtyArgs(name=name)), gfns.astype(GFN_DTYPE).tobytes()
        )

    def can_run(self, handle: int) -> bool:
        """Whether the SP lets the guest bound to this hardware run (the handle is only what the daemon said)."""
        result, _, _ = self.endpoint.call(VmProcessCommand.CAN_RUN.value, dict(HandleArgs(handle=handle)))
        return bool(result["can_run"])

    def detach(self, name: str) -> None:
        self.endpoint.call(VmProcessCommand.VM_DETACH.value, {"name": name}, timeout=2)

    def on_close(self, callback: Any) -> None:
        self.endpoint.on_close(callback)

    def close(self) -> None:
        self.endpoint.close()
