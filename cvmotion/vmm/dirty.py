"""vmm layer: dirty-page bitmaps -- the result of a harvest (``DirtyLog``) and the VMM's own write log.

Bitmaps use KVM's layout (``KVM_GET_DIRTY_LOG``, api.rst 4.8): one bit per 4 KiB page of a memory slot,
little-endian 64-bit words, bit ``i`` = page ``first_gfn + i``.  Every operation is vectorised with
numpy: a harvest of a 64 GiB slot is a 2 MiB bitmap and must never be walked page by page in Python.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import numpy as np
import numpy.typing as npt

from cvmotion.vmm.layout import PAGE_SHIFT, Gfn, MemoryRegion

__all__ = ["DirtyLog", "VmmDirtyBitmap", "bitmap_words", "gfns_from_bitmap"]

U64Array = npt.NDArray[np.uint64]


def bitmap_words(npages: int) -> int:
    """64-bit words needed for ``npages`` bits (KVM rounds the user bitmap to longs)."""
    return (npages + 63) // 64


def gfns_from_bitmap(words: U64Array, first_gfn: int) -> U64Array:
    """Sorted GFNs of the set bits; cost follows the number of non-zero words, not the slot size."""
    nonzero = np.flatnonzero(words)
    if nonzero.size == 0:
        return np.empty(0, dtype=np.uint64)
    bits = np.unpackbits(words[nonzero].view(np.uint8), bitorder="little").reshape(-1, 64)
    rows, cols = np.nonzero(bits)
    return (nonzero[rows].astype(np.uint64) << np.uint64(6)) + cols.astype(np.uint64) + np.uint64(first_gfn)


class DirtyLog:
    """The pages dirtied since the previous harvest, one bitmap per memory region.

    The migration engine batches on ``gfns()`` (a sorted ``uint64`` array) or ``runs()``; ``in`` and
    iteration exist for tests and small sets.
    """

    __slots__ = ("_bitmaps",)

    def __init__(self, bitmaps: Sequence[tuple[MemoryRegion, U64Array]]) -> None:
        self._bitmaps = tuple(bitmaps)

    @classmethod
    def empty(cls, regions: Sequence[MemoryRegion]) -> DirtyLog:
        return cls([(r, np.zeros(bitmap_words(r.npages), dtype=np.uint64)) for r in regions])

    def bitmaps(self) -> tuple[tuple[MemoryRegion, U64Array], ...]:
        return self._bitmaps

    def gfns(self) -> U64Array:
        parts = [gfns_from_bitmap(words, region.first_gfn) for region, words in self._bitmaps]
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)

    def runs(self) -> list[tuple[Gfn, int]]:
        """Maximal runs of consecutive dirty GFNs as ``(first, count)``: batch reads from the memfd."""
        gfns = self.gfns()
        if gfns.size == 0:
            return []
        breaks = np.flatnonzero(np.diff(gfns) != 1) + 1
        starts = np.concatenate(([0], breaks))
        ends = np.concatenate((breaks, [gfns.size]))
        return [(Gfn(int(gfns[s])), int(e - s)) for s, e in zip(starts, ends, strict=True)]

    def count(self) -> int:
        return int(sum(int(np.bitwise_count(words).sum()) for _, words in self._bitmaps))

    def __len__(self) -> int:
        return self.count()

    def __bool__(self) -> bool:
        return any(bool(words.any()) for _, words in self._bitmaps)

    def __contains__(self, gfn: object) -> bool:
        if not isinstance(gfn, int | np.integer):
            return False
        g = int(gfn)
        for region, words in self._bitmaps:
            i = g - region.first_gfn
            if 0 <= i < region.npages:
                return bool((int(words[i >> 6]) >> (i & 63)) & 1)
        return False

    def __iter__(self) -> Iterator[Gfn]:
        return (Gfn(int(g)) for g in self.gfns())

    def __or__(self, other: DirtyLog) -> DirtyLog:
        if [r for r, _ in self._bitmaps] != [r for r, _ in other._bitmaps]:
            raise ValueError("dirty logs of different memory layouts")
        return DirtyLog([(r, a | b) for (r, a), (_, b) in zip(self._bitmaps, other._bitmaps, strict=True)])

    def as_set(self) -> set[int]:
        return {int(g) for g in self.gfns()}


class VmmDirtyBitmap:
    """Pages written by the VMM itself (devices, restore, ``write_pages``): not visible to KVM's log.

    Thread-safe: devices mark from vCPU threads while the engine harvests from its own.  The bitmaps are
    ``np.zeros`` allocations, which the C library serves with fresh anonymous mappings, so a 672 GiB VM's
    21 MiB of bitmap costs nothing until the VMM writes.
    """

    def __init__(self, regions: Sequence[MemoryRegion]) -> None:
        self._regions = tuple(regions)
        self._lock = threading.Lock()
        self._words = [np.zeros(bitmap_words(r.npages), dtype=np.uint64) for r in self._regions]
        self._marked = False  # any bit set since the last take: a harvest with none reads no bitmap

    def mark_range(self, gpa: int, length: int) -> None:
        if length <= 0:
            return
        first, last = gpa >> PAGE_SHIFT, (gpa + length - 1) >> PAGE_SHIFT
        if first == last:  # the common case (a device's small write): no arrays
            with self._lock:
                for region, words in zip(self._regions, self._words, strict=True):
                    i = first - region.first_gfn
                    if 0 <= i < region.npages:
                        words[i >> 6] |= np.uint64(1 << (i & 63))
                        self._marked = True
            return
        self.mark_gfns(np.arange(first, last + 1, dtype=np.uint64))

    def mark_gfns(self, gfns: U64Array) -> None:
        with self._lock:
            self._marked = self._marked or bool(gfns.size)
            for region, words in zip(self._regions, self._words, strict=True):
                idx = gfns[(gfns >= region.first_gfn) & (gfns < region.first_gfn + region.npages)]
                idx = idx - np.uint64(region.first_gfn)
                np.bitwise_or.at(words, idx >> np.uint64(6), np.left_shift(np.uint64(1), idx & np.uint64(63)))

    def take(self) -> DirtyLog:
        """Return the marked pages and start a new, empty log (atomically): the only way bits leave it."""
        with self._lock:
            taken, self._words = self._words, [np.zeros_like(w) for w in self._words]
            self._marked = False
        return DirtyLog(list(zip(self._regions, taken, strict=True)))

    def take_marked(self) -> DirtyLog | None:
        """``take``, or None (and nothing allocated or read) when no page was marked since the last take."""
        # Read without the lock: a mark that lands after this look stays for the next take, none is lost.
        return self.take() if self._marked else None
