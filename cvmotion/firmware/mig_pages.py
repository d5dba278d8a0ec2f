"""firmware layer: the migration stream's per-page work, vectorised (IVs, AADs, zero test, GFN runs).

The wire format seals every page on its own (AES-256-GCM, IV = iv_counter ‖ stream ‖ 0, AAD = bundle header ‖
GPA entry: ``abi.wire``), so a bundle of 512 pages is 512 cipher calls.  Everything around those calls is done
here a bundle at a time with numpy: the IVs and AADs are built as one buffer each, guest memory is reached one
view per run of consecutive GFNs, and zero pages are found with one pass over each run.
"""

from __future__ import annotations

import struct
from typing import Protocol

import numpy as np
import numpy.typing as npt

from cvmotion.abi import wire
from cvmotion.abi.wire import EntryFlag
from cvmotion.errors import MalformedStructure

__all__ = [
    "gcm_ivs",
    "gfn_runs",
    "memory_entries",
    "page_aads",
    "page_views",
]

PAGE = wire.PAGE_SIZE
_ZERO_PAGE = bytes(PAGE)
_VECTOR_RUN = 16  # runs of at least this many pages are zero-tested with numpy, shorter ones page by page
_MEM_HEAD = struct.Struct("<HHI")  # abi.wire MEMORY metadata head: num_entries, reserved, reserved


class _Views(Protocol):
    def view(self, gpa: int, length: int) -> memoryview: ...


def memory_entries(metadata: bytes) -> npt.NDArray[np.uint64]:
    """``wire.parse_memory_metadata`` with the entry checks vectorised (same rules, same errors)."""
    if len(metadata) < _MEM_HEAD.size:
        raise MalformedStructure("memory bundle: metadata too short")
    count, rsvd0, rsvd1 = _MEM_HEAD.unpack_from(metadata)
    if rsvd0 or rsvd1:
        raise MalformedStructure("memory bundle: reserved metadata fields must be zero")
    if not 0 < count <= wire.MAX_PAGES_PER_BUNDLE or len(metadata) != _MEM_HEAD.size + 8 * count:
        raise MalformedStructure(f"memory bundle: {count} entries do not match {len(metadata)} metadata bytes")
    entries = np.frombuffer(metadata, dtype="<u8", offset=_MEM_HEAD.size).astype(np.uint64)
    if np.any(entries & np.uint64((PAGE - 1) & ~int(EntryFlag.ZERO))):
        raise MalformedStructure("memory bundle: an entry has reserved flag bits set")
    return entries


def gfn_runs(gfns: npt.NDArray[np.uint64]) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive GFNs, in order, as ``(first GFN, start index, end index)``."""
    count = len(gfns)
    breaks = (np.flatnonzero(np.diff(gfns.astype(np.int64)) != 1) + 1).tolist()
    starts = [0, *breaks]
    return list(zip(gfns[starts].tolist(), starts, [*breaks, count], strict=True))


def page_views(
    memory: _Views, gfns: npt.NDArray[np.uint64]
) -> tuple[list[memoryview], npt.NDArray[np.bool_], npt.NDArray[np.uint64]]:
    """One view per page of guest memory in ``gfns`` order, which pages hold a non-zero byte, and each page's
    address (for the native AES-GCM; valid while the views are alive).

    Consecutive GFNs are one view of guest memory (round 0 is mostly long runs); the zero test is one
    vectorised pass over each run instead of a comparison per page.
    """
    pages: list[memoryview] = []
    nonzero = np.empty(len(gfns), dtype=np.bool_)
    addresses = np.empty(len(gfns), dtype=np.uint64)
    for first, lo, hi in gfn_runs(gfns):
        run = memory.view(first << 12, (hi - lo) * PAGE)
        words = np.frombuffer(run, dtype=np.uint64)
        addresses[lo:hi] = np.uint64(words.ctypes.data) + np.arange(hi - lo, dtype=np.uint64) * np.uint64(PAGE)
        if hi - lo >= _VECTOR_RUN:
            pages.extend(run[j : j + PAGE] for j in range(0, (hi - lo) * PAGE, PAGE))
            nonzero[lo:hi] = words.reshape(hi - lo, PAGE // 8).max(axis=1) != 0
        else:
            # Short runs (a dirty round's scattered pages): a compare per page beats numpy's per-call cost,
            # and stops at the first non-zero byte.
            for j in range(hi - lo):
                page = run[j * PAGE : (j + 1) * PAGE]
                pages.append(page)
                nonzero[lo + j] = page != _ZERO_PAGE
    return pages, nonzero, addresses


def gcm_ivs(first: int, count: int, stream: int) -> memoryview:
    """``count`` consecutive 96-bit IVs (``wire.gcm_iv``: iv_counter u64 LE || stream u16 LE || 0), packed."""
    ivs = np.zeros((count, 12), dtype=np.uint8)
    ivs[:, :8] = np.arange(first, first + count, dtype=np.uint64).astype("<u8").view(np.uint8).reshape(count, 8)
    ivs[:, 8] = stream & 0xFF
    ivs[:, 9] = stream >> 8
    return memoryview(ivs.tobytes())


def page_aads(head: bytes, entries: npt.NDArray[np.uint64]) -> memoryview:
    """Per-page AADs (``wire.aad_for_page``: header || GPA entry u64 LE), packed 32 bytes apiece."""
    count = len(entries)
    aads = np.empty((count, wire.HEADER_SIZE + 8), dtype=np.uint8)
    aads[:, : wire.HEADER_SIZE] = np.frombuffer(head, dtype=np.uint8)
    aads[:, wire.HEADER_SIZE :] = entries.astype("<u8").view(np.uint8).reshape(count, 8)
    return memoryview(aads.tobytes())
