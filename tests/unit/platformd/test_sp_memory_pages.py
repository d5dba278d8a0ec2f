"""The SP's page writes into guest memory (``SpMemory.write_pages``): long runs by ``pwrite``, scattered pages
through the mapping, every page where its GFN says, across the 4 GiB hole."""

from __future__ import annotations

import numpy as np
import pytest

from cvmotion.errors import UsageError
from cvmotion.platformd.hardware import SpMemory
from cvmotion.vmm.layout import MIB
from cvmotion.vmm.memory import GuestMemory

PAGE = 4096


@pytest.fixture
def memory() -> SpMemory:
    return SpMemory(GuestMemory(4096 * MIB))  # RAM below and above the 4 GiB hole


def test_runs_and_scattered_pages_land_where_their_gfns_say(memory: SpMemory) -> None:
    low = memory.layout.regions[0]
    high_first = memory.layout.regions[1].gpa >> 12
    gfns = np.asarray(
        [
            *range(0x100, 0x120),
            0x200,
            0x202,
            0x210,
            (low.size >> 12) - 1,
            high_first,
            *range(high_first + 5, high_first + 25),
        ],
        dtype=np.uint64,
    )
    data = np.arange(len(gfns) * PAGE // 8, dtype=np.uint64).view(np.uint8)
    try:
        memory.write_pages(gfns, memoryview(data))
        for i, gfn in enumerate(gfns.tolist()):
            assert bytes(memory.view(gfn << 12, PAGE)) == data[i * PAGE : (i + 1) * PAGE].tobytes(), hex(gfn)
        assert bytes(memory.view(0x201 << 12, PAGE)) == bytes(PAGE)  # its neighbours untouched
    finally:
        memory.close()


def test_a_gfn_outside_ram_is_refused_before_anything_is_written(memory: SpMemory) -> None:
    hole = (memory.layout.regions[0].size >> 12) + 1
    try:
        with pytest.raises(UsageError, match="outside guest RAM"):
            memory.write_pages(np.asarray([0x100, hole], dtype=np.uint64), memoryview(bytearray(b"\xff" * 2 * PAGE)))
        assert bytes(memory.view(0x100 << 12, PAGE)) == bytes(PAGE)
    finally:
        memory.close()
