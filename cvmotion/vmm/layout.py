"""vmm layer: guest-physical address types and the PC-style RAM layout (regions = KVM memory slots).

Layout (like QEMU's ``pc`` machine)::

    GPA 0 ............ min(size, 3 GiB)       region 0, memfd offset 0
    GPA 3 GiB ........ 4 GiB                  hole (MMIO: LAPIC, IOAPIC, firmware) -- no RAM
    GPA 4 GiB ........ 4 GiB + (size - 3 GiB) region 1, memfd offset 3 GiB   (only when size > 3 GiB)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NewType

import numpy as np
import numpy.typing as npt

from cvmotion.abi.sku import GIB, MAX_MEMORY, MIB, MIN_MEMORY
from cvmotion.errors import UsageError

__all__ = [
    "GIB",
    "HIGH_MEMORY_BASE",
    "LOW_MEMORY_LIMIT",
    "MAX_MEMORY",
    "MIB",
    "MIN_MEMORY",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "Gfn",
    "Gpa",
    "Hva",
    "MemoryLayout",
    "MemoryRegion",
]

Gpa = NewType("Gpa", int)
Gfn = NewType("Gfn", int)
Hva = NewType("Hva", int)

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
LOW_MEMORY_LIMIT = 3 * GIB  # RAM below the 32-bit PCI/MMIO hole
HIGH_MEMORY_BASE = 4 * GIB


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    """One contiguous RAM range: a KVM memory slot, backed by ``[offset, offset + size)`` of the memfd."""

    slot: int
    gpa: Gpa
    size: int
    offset: int

    @property
    def end(self) -> Gpa:
        return Gpa(self.gpa + self.size)

    @property
    def first_gfn(self) -> Gfn:
        return Gfn(self.gpa >> PAGE_SHIFT)

    @property
    def npages(self) -> int:
        return self.size >> PAGE_SHIFT


@dataclass(frozen=True, slots=True)
class MemoryLayout:
    """Where the memfd's bytes appear in guest-physical address space."""

    size: int
    regions: tuple[MemoryRegion, ...]

    @classmethod
    def for_size(cls, size: int) -> MemoryLayout:
        """The PC layout for ``size`` bytes of RAM.

        Raises:
            UsageError: size not a multiple of 1 MiB, or outside ``[MIN_MEMORY, MAX_MEMORY]``.
        """
        if size % MIB or not MIN_MEMORY <= size <= MAX_MEMORY:
            raise UsageError(
                f"memory size {size:#x} must be a multiple of 1 MiB between {MIN_MEMORY // MIB} MiB and "
                f"{MAX_MEMORY // GIB} GiB"
            )
        low = min(size, LOW_MEMORY_LIMIT)
        regions = [MemoryRegion(0, Gpa(0), low, 0)]
        if size > low:
            regions.append(MemoryRegion(1, Gpa(HIGH_MEMORY_BASE), size - low, low))
        return cls(size, tuple(regions))

    @property
    def low_size(self) -> int:
        return self.regions[0].size

    def region_of(self, gpa: int, length: int = 1) -> MemoryRegion:
        """The region holding ``[gpa, gpa + length)``.

        Raises:
            UsageError: the range is not RAM or straddles a region boundary.
        """
        for region in self.regions:
            if region.gpa <= gpa and gpa + length <= region.end:
                return region
        raise UsageError(f"GPA range {gpa:#x}..{gpa + length:#x} is not guest RAM")

    def offset_of(self, gpa: int, length: int = 1) -> int:
        region = self.region_of(gpa, length)
        return region.offset + (gpa - region.gpa)

    def page_offsets(self, gfns: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
        """The memfd byte offset of each GFN's page, vectorised; ``UsageError`` if one is not RAM."""
        pages = gfns.astype(np.int64)
        offsets = np.full(len(pages), -1, dtype=np.int64)
        for region in self.regions:
            first = region.gpa >> PAGE_SHIFT
            inside = (pages >= first) & (pages < first + (region.size >> PAGE_SHIFT))
            offsets[inside] = (pages[inside] - first) * PAGE_SIZE + region.offset
        if len(offsets) and int(offsets.min()) < 0:
            raise UsageError("a GFN outside guest RAM")
        return offsets

    def gpa_ranges_of(self, offset: int, length: int) -> list[tuple[Gpa, int]]:
        """Translate a memfd byte range into GPA ranges (split where the hole cuts it)."""
        out: list[tuple[Gpa, int]] = []
        end = offset + length
        for region in self.regions:
            lo, hi = max(offset, region.offset), min(end, region.offset + region.size)
            if lo < hi:
                out.append((Gpa(region.gpa + lo - region.offset), hi - lo))
        return out
