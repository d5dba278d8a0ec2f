"""platformd: the secure processor's view of VM hardware — guest memory, dirty view, state — and the rings.

A VM process hands the platform its memfd (``vm_attach``); the SP maps it (``SpMemory``) and reaches the rest of the
hardware through the VM process (``vmd.client.HardwareClient``).  ``RemoteHardware.claimed`` is what stops a second
guest context over a VM's memory (a fork, and a measurement oracle): hardware serves one guest in its life.  The
daemon's rings are mapped here too; imports are opened from a private copy of the ring's bytes.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from cvmotion.abi.gfns import long_runs, sorted_union
from cvmotion.abi.wire import BundleType
from cvmotion.errors import FirmwareError, FirmwareStatus, UsageError
from cvmotion.firmware.device import GuestHandle
from cvmotion.firmware.migration import MigrationFirmware
from cvmotion.ipc.rpc import Endpoint
from cvmotion.vmd.client import HardwareClient
from cvmotion.vmm.layout import Gpa
from cvmotion.vmm.loader import SECRETS_PAGE_GPA
from cvmotion.vmm.memory import GuestMemory

__all__ = ["ImportHardware", "RemoteHardware", "RingMap", "SpMemory", "check_launch_ranges"]

PAGE = 4096
_FOLD_PARTS = 32  # pending dirty harvests kept apart before they are folded into one
_PWRITE_RUN = 16  # pages: a run this long is written with pwrite, shorter ones through the mapping


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

    def populated_ranges(self, skip: Sequence[tuple[int, int]] = ()) -> list[tuple[Gpa, int]]:
        return self._memory.populated_ranges(skip)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self._pwrite(self.layout.offset_of(gpa, len(data)), memoryview(data))

    def _pwrite(self, offset: int, view: memoryview) -> None:
        while len(view):
            written = os.pwrite(self._memory.fd, view, offset)
            view, offset = view[written:], offset + written

    def page_offsets(self, gfns: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
        return self._memory.page_offsets(gfns)

    def pages(self) -> npt.NDArray[np.uint64]:
        return self._memory.pages()

    def write_pages(self, gfns: npt.NDArray[np.uint64], data: bytes | bytearray | memoryview) -> None:
        """Whole pages, ``data`` in ``gfns`` order: runs of ``_PWRITE_RUN`` pages or more with one ``pwrite``
        each (fresh memory: the kernel allocates without a fault per page), the rest (a dirty round's
        scattered pages, already populated by round 0) in one vectorised copy through the mapping."""
        offsets = self.page_offsets(gfns)
        words = np.frombuffer(data, dtype=np.uint64).reshape(-1, PAGE // 8)
        if len(words) != len(offsets):
            raise UsageError(f"write_pages: {len(offsets)} GFNs and {len(words)} pages of data")
        runs, short = long_runs(offsets // PAGE, _PWRITE_RUN)
        view = memoryview(data)
        for lo, hi in runs:
            self._pwrite(int(offsets[lo]), view[lo * PAGE : hi * PAGE])
        if short.any():
            table = self.pages()
            table[offsets[short] // PAGE] = words[short]

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
        self._vm = HardwareClient(endpoint)
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
        # Handed to the VM process at attach (only it holds it, in memory): across a platform restart it proves that
        # a re-attaching process is the hardware this guest ran on (``platformd.succession``).
        self.token = os.urandom(32)
        # When the VM process last stopped the vCPUs for the SP's switchover (its clock; for the host's stats).
        self.paused_at: float | None = None

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
            parts.append(self._vm.take_dirty(fresh=True))
        return self._with_pending(parts)

    def _with_pending(self, parts: list[npt.NDArray[np.uint64]]) -> npt.NDArray[np.uint64]:
        """``parts`` and every harvest the VM process handed over since the SP last took them, as one set."""
        with self._dirty_lock:
            parts = parts + self._dirty
            self._dirty = []
        parts = [p for p in parts if len(p)]
        if not parts:
            return np.zeros(0, dtype=np.uint64)
        return sorted_union(*parts)

    def hold_paused(self) -> npt.NDArray[np.uint64]:
        return self._with_pending([self._vm.hold_paused()])

    def capture_state(self) -> tuple[bytes, bytes]:
        return self._vm.capture_state()

    def capture_and_harvest(self) -> tuple[bytes, bytes, npt.NDArray[np.uint64]]:
        vcpu, device, fresh = self._vm.capture_and_harvest()
        return vcpu, device, self._with_pending([fresh])

    def pause_capture_harvest(self) -> tuple[bytes, bytes, npt.NDArray[np.uint64]]:
        vcpu, device, fresh, self.paused_at = self._vm.pause_capture_harvest()
        return vcpu, device, self._with_pending([fresh])

    def restore_state(self, vcpu_state: bytes, device_state: bytes, *, run: bool = False) -> None:
        raise FirmwareError(FirmwareStatus.INVALID_GUEST_STATE, "use restore_with_handle")

    def restore_with_handle(
        self, handle: int, vcpu_state: bytes, device_state: bytes, *, run: bool = False
    ) -> float | None:
        """Restore the VM process's guest; ``run``: and run it, returning the Unix time its vCPUs were released."""
        return self._vm.restore_state(handle, vcpu_state, device_state, run=run)

    def close(self) -> None:
        self._memory.close()


class ImportHardware:
    """The destination's hardware during an import: restore needs the guest handle, known only at commit."""

    def __init__(self, hw: RemoteHardware) -> None:
        self._hw = hw
        self.handle: int | None = None
        self.resumed_at: float | None = None  # when a restore with ``run`` released the vCPUs (the VM's clock)

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

    def hold_paused(self) -> npt.NDArray[np.uint64]:
        return np.zeros(0, dtype=np.uint64)

    def capture_state(self) -> tuple[bytes, bytes]:
        raise FirmwareError(FirmwareStatus.INVALID_GUEST_STATE, "an importing VM has no state to capture")

    def capture_and_harvest(self) -> tuple[bytes, bytes, npt.NDArray[np.uint64]]:
        raise FirmwareError(FirmwareStatus.INVALID_GUEST_STATE, "an importing VM has no state to capture")

    def pause_capture_harvest(self) -> tuple[bytes, bytes, npt.NDArray[np.uint64]]:
        raise FirmwareError(FirmwareStatus.INVALID_GUEST_STATE, "an importing VM has no state to capture")

    def restore_state(self, vcpu_state: bytes, device_state: bytes, *, run: bool = False) -> None:
        if self.handle is None:
            raise FirmwareError(FirmwareStatus.INVALID_GUEST_STATE, "import has no guest handle")
        self.resumed_at = self._hw.restore_with_handle(self.handle, vcpu_state, device_state, run=run)


class RingMap:
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


def check_launch_ranges(raw: Any, gfn_limit: int) -> list[tuple[int, int]]:
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
