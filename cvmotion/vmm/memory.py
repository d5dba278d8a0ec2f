"""vmm layer: guest memory as one shared memfd, its PC-style layout, and zero-copy access for the VMM.

The memfd has the VM's full size but is sparse: nothing is populated until the guest (or the VMM)
touches a page, so an EC96as_v5 (672 GiB) VM is honest on a small host while its working set is small.
``populated_ranges()`` asks the kernel (``lseek(SEEK_DATA/SEEK_HOLE)``) instead of scanning.

The layout (regions, GPA types) lives in ``cvmotion.vmm.layout``.

The VMM's own writes (device DMA, migration ``write_pages``) are not in KVM's dirty log, so every write
through this class sets a bit in the VMM dirty bitmap (``cvmotion.vmm.dirty``).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

from cvmotion.errors import UsageError
from cvmotion.vmm.dirty import VmmDirtyBitmap
from cvmotion.vmm.layout import PAGE_SHIFT, PAGE_SIZE, Gpa, Hva, MemoryLayout, MemoryRegion

__all__ = ["GuestMemory"]


def _gaps(known: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` byte ranges of ``[0, size)`` outside ``known`` (sorted ``(offset, length)`` ranges)."""
    gaps: list[tuple[int, int]] = []
    cursor = 0
    for offset, length in known:
        if offset > cursor:
            gaps.append((cursor, offset))
        cursor = max(cursor, offset + length)
    if cursor < size:
        gaps.append((cursor, size))
    return gaps


class GuestMemory:
    """Guest RAM: a sparse shared memfd mapped once into the VMM.

    Args:
        size: bytes of RAM (the SKU size).
        fd: adopt an existing memfd of that size (restore in another process) instead of creating one;
            the object takes ownership and closes it.
        name: memfd name, visible in ``/proc/PID/fd``.
    """

    def __init__(self, size: int, *, fd: int | None = None, name: str = "cvmotion-guest-ram") -> None:
        self.layout = MemoryLayout.for_size(size)
        if fd is None:
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
            except OSError:
                os.close(fd)
                raise
        elif os.fstat(fd).st_size != size:
            raise UsageError(f"memory file is {os.fstat(fd).st_size:#x} bytes, the VM needs {size:#x}")
        self._fd = fd
        # ABI: KVM memory slots and unicorn's mem_map_ptr point into this mapping; it must outlive them.
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._anchor: ctypes.c_char | None = ctypes.c_char.from_buffer(self._map)
        self._base = ctypes.addressof(self._anchor)
        self._view: memoryview | None = memoryview(self._map)
        self.vmm_dirty = VmmDirtyBitmap(self.layout.regions)

    @property
    def size(self) -> int:
        return self.layout.size

    @property
    def fd(self) -> int:
        """The memfd (the secure processor and a restoring process may be handed it)."""
        return self._fd

    def hva(self, gpa: int) -> Hva:
        """Host virtual address of a GPA inside this process's mapping."""
        return Hva(self._base + self.layout.offset_of(gpa))

    def region_hva(self, region: MemoryRegion) -> Hva:
        return Hva(self._base + region.offset)

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy view of ``[gpa, gpa + length)``; the VMM must not write through it (use ``write``)."""
        if self._view is None:
            raise UsageError("guest memory is closed")
        offset = self.layout.offset_of(gpa, length)
        return self._view[offset : offset + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Write as the VMM (device DMA, restore); the pages are marked in the VMM dirty bitmap."""
        if not data:
            return
        self.view(gpa, len(data))[:] = data
        self.vmm_dirty.mark_range(gpa, len(data))

    def page_offsets(self, gfns: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
        """The memfd offset of each GFN's page (vectorised ``layout.offset_of``); ``UsageError`` outside RAM."""
        return self.layout.page_offsets(gfns)

    def pages(self) -> npt.NDArray[np.uint64]:
        """All of guest RAM as one ``(pages, 512)`` array of words over the mapping (no copy), indexed by memfd
        offset // 4096: whole pages read and written many at a time.  Drop it before ``close``."""
        if self._view is None:
            raise UsageError("guest memory is closed")
        return np.frombuffer(self._view, dtype=np.uint64).reshape(-1, PAGE_SIZE // 8)

    def page(self, gfn: int) -> memoryview:
        return self.view(gfn << PAGE_SHIFT, PAGE_SIZE)

    def read_pages(self, gfns: Iterable[int] | npt.NDArray[np.uint64]) -> bytes:
        """The pages' bytes, concatenated in the order given."""
        return b"".join(self.page(int(g)) for g in gfns)

    def write_pages(self, gfns: Iterable[int] | npt.NDArray[np.uint64], data: bytes | memoryview) -> None:
        """Write whole pages (migration destination); every page lands in the VMM dirty bitmap.

        Raises:
            UsageError: ``data`` is not exactly one page per GFN.
        """
        frames = [int(g) for g in gfns]
        if len(data) != len(frames) * PAGE_SIZE:
            raise UsageError(
                f"write_pages: {len(frames)} GFNs need {len(frames) * PAGE_SIZE:#x} bytes, got {len(data):#x}"
            )
        src = memoryview(data)
        for i, gfn in enumerate(frames):
            self.page(gfn)[:] = src[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
        self.vmm_dirty.mark_gfns(np.asarray(frames, dtype=np.uint64))

    def populated_ranges(self, skip: Sequence[tuple[int, int]] = ()) -> list[tuple[Gpa, int]]:
        """GPA ranges backed by memfd pages (``SEEK_DATA``/``SEEK_HOLE``); unpopulated RAM reads as zero.

        ``skip``: GPA ranges the caller already knows (an earlier answer): only what lies outside them is looked
        for, so the cost follows what is new, not the whole populated set. ``SEEK_HOLE`` walks the page cache
        page by page (8-10 ms per GiB populated under this machine's nested KVM); ``SEEK_DATA`` over a hole
        skips empty page-cache nodes. A run that starts in a gap is reported up to the gap's end.
        """
        gaps = _gaps(sorted((self.layout.offset_of(gpa, length), length) for gpa, length in skip if length), self.size)
        out: list[tuple[Gpa, int]] = []
        for lo, hi in gaps:
            offset = lo
            while offset < hi:
                try:
                    start = os.lseek(self._fd, offset, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:  # no data after offset, in this gap or any later one
                        return out
                    raise
                if start >= hi:
                    break
                end = min(os.lseek(self._fd, start, os.SEEK_HOLE), hi)
                out.extend(self.layout.gpa_ranges_of(start, end - start))
                offset = end
        return out

    def populated_bytes(self) -> int:
        return sum(length for _, length in self.populated_ranges())

    def close(self) -> None:
        """Unmap and close the memfd.  Callers must have torn down KVM slots / unicorn maps first."""
        if self._view is None:
            return
        self._view.release()
        self._view = None
        self._anchor = None
        self._map.close()
        os.close(self._fd)

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
