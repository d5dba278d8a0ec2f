"""firmware layer: the migration stream's per-page work, vectorised (IVs, AADs, zero test, GFN runs).

The wire format seals every page on its own (AES-256-GCM, IV = iv_counter ‖ stream ‖ 0, AAD = bundle header ‖
GPA entry: ``abi.wire``), so a bundle of 512 pages is 512 cipher calls.  Everything around those calls is done
here a bundle at a time with numpy: the IVs and AADs are built as one buffer each, page addresses come from the
memory layout in one vectorised step, and zero pages are found with one pass over each run or one gather.
"""

from __future__ import annotations

import struct
from typing import Protocol

import numpy as np
import numpy.typing as npt

from cvmotion.abi import wire
from cvmotion.abi.gfns import long_runs
from cvmotion.abi.wire import EntryFlag
from cvmotion.errors import MalformedStructure

__all__ = [
    "gcm_ivs",
    "memory_entries",
    "page_aads",
    "page_reads",
    "page_views",
]

PAGE = wire.PAGE_SIZE
_VECTOR_RUN = 16  # runs of at least this many pages are zero-tested in place, shorter ones gathered first
_MEM_HEAD = struct.Struct("<HHI")  # abi.wire MEMORY metadata head: num_entries, reserved, reserved


class _Views(Protocol):
    def view(self, gpa: int, length: int) -> memoryview: ...

    def page_offsets(self, gfns: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]: ...

    def pages(self) -> npt.NDArray[np.uint64]: ...


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


def page_reads(
    memory: _Views, gfns: npt.NDArray[np.uint64]
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """Which pages of ``gfns`` hold a non-zero byte, each page's address (for the native AES-GCM), and the array
    over guest memory the addresses point into (keep it referenced while they are used).

    No Python per page.  A page whose first word is non-zero is decided by that word alone (one cache line; the
    AES-GCM reads the rest next); only the others are read whole: a run of consecutive GFNs (round 0) as one
    slice of guest memory, the scattered pages of a dirty round with one gather.
    """
    offsets = memory.page_offsets(gfns)
    table = memory.pages()
    rows = offsets // PAGE
    addresses = np.uint64(table.ctypes.data) + offsets.astype(np.uint64)
    nonzero = table[rows, 0] != 0
    if not nonzero.all():
        maybe = np.flatnonzero(~nonzero)
        nonzero[maybe] = _any_nonzero(table, rows[maybe])
    return nonzero, addresses, table


def _any_nonzero(table: npt.NDArray[np.uint64], rows: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    """Whether each of ``rows`` (pages of ``table``, ascending where they run) holds a non-zero word."""
    nonzero = np.empty(len(rows), dtype=np.bool_)
    runs, short = long_runs(rows, _VECTOR_RUN)
    for lo, hi in runs:
        first = int(rows[lo])
        nonzero[lo:hi] = table[first : first + hi - lo].max(axis=1) != 0
    if short.any():
        nonzero[short] = table[rows[short]].any(axis=1)
    return nonzero


def page_views(memory: _Views, gfns: npt.NDArray[np.uint64]) -> list[memoryview]:
    """One view per page of guest memory, in ``gfns`` order (the pure-Python AES-GCM path)."""
    return [memory.view(gfn << 12, PAGE) for gfn in gfns.tolist()]


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
