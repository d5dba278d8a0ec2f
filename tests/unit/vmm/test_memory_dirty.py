"""Guest memory (memfd, layout, populated ranges, VMM writes) and dirty bitmaps, without a CPU."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cvmotion.errors import UsageError
from cvmotion.vmm.dirty import DirtyLog, bitmap_words, gfns_from_bitmap
from cvmotion.vmm.layout import GIB, HIGH_MEMORY_BASE, MIB, PAGE_SIZE, MemoryLayout, MemoryRegion
from cvmotion.vmm.memory import GuestMemory


def test_layout_puts_a_hole_below_4g() -> None:
    small = MemoryLayout.for_size(64 * MIB)
    assert [(r.gpa, r.size) for r in small.regions] == [(0, 64 * MIB)]
    big = MemoryLayout.for_size(672 * GIB)
    assert [(r.gpa, r.size, r.offset) for r in big.regions] == [
        (0, 3 * GIB, 0),
        (HIGH_MEMORY_BASE, 669 * GIB, 3 * GIB),
    ]
    assert big.offset_of(HIGH_MEMORY_BASE + 5) == 3 * GIB + 5
    assert big.gpa_ranges_of(3 * GIB - 4096, 8192) == [(3 * GIB - 4096, 4096), (HIGH_MEMORY_BASE, 4096)]
    with pytest.raises(UsageError, match="not guest RAM"):
        big.region_of(3 * GIB + 1)


@pytest.mark.parametrize("size", [0, 3 * MIB, 64 * MIB + 1, 8192 * GIB])
def test_layout_rejects_bad_sizes(size: int) -> None:
    with pytest.raises(UsageError, match="multiple of 1 MiB"):
        MemoryLayout.for_size(size)


def test_full_size_memfd_is_sparse_and_reports_populated_ranges() -> None:
    with GuestMemory(672 * GIB) as mem:
        assert mem.populated_ranges() == []
        mem.write(0x1000, b"x")
        mem.write(HIGH_MEMORY_BASE + 100 * GIB, b"y" * (3 * PAGE_SIZE))
        assert mem.populated_ranges() == [(0x1000, PAGE_SIZE), (HIGH_MEMORY_BASE + 100 * GIB, 3 * PAGE_SIZE)]
        assert mem.populated_bytes() == 4 * PAGE_SIZE
        assert mem.read(HIGH_MEMORY_BASE + 100 * GIB, 2) == b"yy"


def test_populated_ranges_outside_known_ones_finds_only_what_is_new() -> None:
    with GuestMemory(672 * GIB) as mem:
        mem.write(0x10000, b"x" * (4 * PAGE_SIZE))
        mem.write(HIGH_MEMORY_BASE + GIB, b"y")
        known = mem.populated_ranges()
        assert mem.populated_ranges(skip=known) == []
        mem.write(0x10000 + 2 * PAGE_SIZE, b"rewritten inside a known range: not new")
        mem.write(0x8000, b"before the first range")
        mem.write(0x10000 + 4 * PAGE_SIZE, b"right after the first range")  # adjacent: its own run
        mem.write(3 * GIB - PAGE_SIZE, b"the last page below the hole")
        mem.write(HIGH_MEMORY_BASE + 600 * GIB, b"far above")
        assert mem.populated_ranges(skip=known) == [
            (0x8000, PAGE_SIZE),
            (0x10000 + 4 * PAGE_SIZE, PAGE_SIZE),
            (3 * GIB - PAGE_SIZE, PAGE_SIZE),
            (HIGH_MEMORY_BASE + 600 * GIB, PAGE_SIZE),
        ]
        # Known and new together are everything populated, each page once.
        everything = known + mem.populated_ranges(skip=known)
        pages = sorted(g for gpa, n in everything for g in range(gpa >> 12, (gpa + n) >> 12))
        assert pages == sorted(g for gpa, n in mem.populated_ranges() for g in range(gpa >> 12, (gpa + n) >> 12))


@settings(max_examples=40, deadline=None)
@given(
    before=st.sets(st.integers(0, 4095), max_size=40),
    after=st.sets(st.integers(0, 4095), max_size=40),
)
def test_known_plus_new_is_every_populated_page(before: set[int], after: set[int]) -> None:
    with GuestMemory(16 * MIB) as mem:
        for gfn in before:
            mem.write(gfn * PAGE_SIZE, b"b")
        known = mem.populated_ranges()
        for gfn in after:
            mem.write(gfn * PAGE_SIZE, b"a")
        new = mem.populated_ranges(skip=known)
        found = {g for gpa, n in known + new for g in range(gpa >> 12, (gpa + n) >> 12)}
        assert found == before | after
        assert not {g for gpa, n in new for g in range(gpa >> 12, (gpa + n) >> 12)} & before


def test_vmm_writes_are_tracked_and_taken_once() -> None:
    with GuestMemory(16 * MIB) as mem:
        mem.write(0x1FFF, b"ab")  # straddles pages 1 and 2
        mem.write_pages([7, 9], bytes(2 * PAGE_SIZE))
        log = mem.vmm_dirty.take()
        assert log.as_set() == {1, 2, 7, 9}
        assert mem.vmm_dirty.take().as_set() == set()
        assert mem.read_pages([1, 2])[PAGE_SIZE - 1 : PAGE_SIZE + 1] == b"ab"
        with pytest.raises(UsageError, match="need 0x2000 bytes"):
            mem.write_pages([1, 2], b"short")


def test_vmm_take_marked_is_none_until_a_write_and_then_takes_it() -> None:
    with GuestMemory(16 * MIB) as mem:
        assert mem.vmm_dirty.take_marked() is None
        mem.write(0x3000, b"x")
        log = mem.vmm_dirty.take_marked()
        assert log is not None
        assert log.as_set() == {3}
        assert mem.vmm_dirty.take_marked() is None  # taken once
        mem.write_pages([5], bytes(PAGE_SIZE))
        assert mem.vmm_dirty.take().as_set() == {5}  # take clears the mark too
        assert mem.vmm_dirty.take_marked() is None


def test_memory_can_be_adopted_from_an_fd() -> None:
    import os

    with GuestMemory(8 * MIB) as mem:
        mem.write(0x5000, b"shared")
        fd = os.dup(mem.fd)
        with GuestMemory(8 * MIB, fd=fd) as other:
            assert other.read(0x5000, 6) == b"shared"
        with pytest.raises(UsageError, match="needs"):
            GuestMemory(16 * MIB, fd=os.dup(mem.fd))


_REGION = MemoryRegion(0, 0, 4096 * PAGE_SIZE, 0)


@settings(max_examples=50, deadline=None)
@given(st.sets(st.integers(0, 4095), max_size=300))
def test_bitmap_extraction_matches_a_naive_walk(pages: set[int]) -> None:
    words = np.zeros(bitmap_words(4096), dtype=np.uint64)
    for p in pages:
        words[p >> 6] |= np.uint64(1 << (p & 63))
    log = DirtyLog([(_REGION, words)])
    assert log.gfns().tolist() == sorted(pages)
    assert len(log) == len(pages)
    assert all(p in log for p in pages)
    assert sum(n for _, n in log.runs()) == len(pages)
    assert gfns_from_bitmap(words, 100).tolist() == [p + 100 for p in sorted(pages)]


def test_dirty_logs_merge_and_report_runs() -> None:
    a = DirtyLog.empty([_REGION])
    b = DirtyLog.empty([_REGION])
    a.bitmaps()[0][1][0] = np.uint64(0b1110)
    b.bitmaps()[0][1][1] = np.uint64(1)
    merged = a | b
    assert merged.as_set() == {1, 2, 3, 64}
    assert merged.runs() == [(1, 3), (64, 1)]
    assert not DirtyLog.empty([_REGION])
