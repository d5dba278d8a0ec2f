"""Benchmark: finding the populated ranges of a sparse guest memfd (SEEK_DATA/SEEK_HOLE).

An EC96as_v5-sized memfd (672 GiB) gets 1 GiB populated, contiguously and scattered in 256 KiB and
4 KiB pieces; ``GuestMemory.populated_ranges()`` is timed.  No KVM needed.  The cost is two ``lseek``
calls per populated range, so it follows fragmentation, not the memfd size (``mincore`` over the same
mapping, for comparison, takes about 10 s here).

    .venv/bin/python bench/vmm_populated.py
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

from cvmotion.vmm.layout import GIB, PAGE_SIZE
from cvmotion.vmm.memory import GuestMemory


def populate(mem: GuestMemory, piece: int, rng: np.random.Generator) -> None:
    count = GIB // piece
    slots = mem.size // piece
    chunk = b"\x01" * piece
    for index in np.sort(rng.choice(slots, count, replace=False)):
        os.pwrite(mem.fd, chunk, int(index) * piece)


def main() -> int:
    print("| memfd | populated | layout | ranges found | populated_ranges() median | p90 |")
    print("|---|---|---|---|---|---|")
    for label, piece in (("contiguous", GIB), ("256 KiB pieces", 256 << 10), ("4 KiB pieces", PAGE_SIZE)):
        with GuestMemory(672 * GIB) as mem:
            if piece == GIB:
                block = b"\x01" * (64 << 20)
                for offset in range(10 * GIB, 11 * GIB, len(block)):
                    os.pwrite(mem.fd, block, offset)
            else:
                populate(mem, piece, np.random.default_rng(7))
            times = []
            for _ in range(7):
                t0 = time.perf_counter()
                ranges = mem.populated_ranges()
                times.append(time.perf_counter() - t0)
            total = sum(n for _, n in ranges)
            print(
                f"| 672 GiB | {total >> 20} MiB | {label} | {len(ranges)} | "
                f"{statistics.median(times) * 1e3:.2f} ms | {sorted(times)[-2] * 1e3:.2f} ms |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
