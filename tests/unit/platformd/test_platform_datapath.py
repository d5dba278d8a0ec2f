"""The platform and VM process halves of the migration data path: the SP's dirty view is fed before the engine
sees a harvest, imports open a private copy of the shared ring, and the SP writes guest memory with pwrite."""

from __future__ import annotations

import mmap
import os
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from cvmotion.abi.wire import BundleType
from cvmotion.errors import UsageError
from cvmotion.platformd.hardware import RingMap as _RingMap
from cvmotion.platformd.hardware import SpMemory
from cvmotion.vmd.dirty import DirtyViews
from cvmotion.vmm.layout import GIB
from cvmotion.vmm.memory import GuestMemory


class _Log:
    def __init__(self, gfns: list[int]) -> None:
        self._gfns = np.asarray(gfns, dtype=np.uint64)

    def gfns(self) -> npt.NDArray[np.uint64]:
        return self._gfns


class _FakeVm:
    """Hands out one scripted harvest after another."""

    def __init__(self, harvests: list[list[int]]) -> None:
        self.harvests = harvests

    def start_dirty_tracking(self) -> None:
        return None

    def harvest_dirty(self) -> _Log:
        return _Log(self.harvests.pop(0) if self.harvests else [])


def test_sp_view_is_fed_before_the_engine_gets_a_harvest() -> None:
    events: list[str] = []
    fed: list[list[int]] = []

    def feed(gfns: npt.NDArray[np.uint64]) -> None:
        events.append("sp fed")
        fed.append(gfns.tolist())

    views = DirtyViews(_FakeVm([[], [5, 3], [9], [7]]), feeds={"sp": feed})  # type: ignore[arg-type]
    views.start()  # the engine's baseline: one (empty) harvest
    got = views.take("engine")
    events.append("engine has it")
    assert got.tolist() == [3, 5]
    assert events == ["sp fed", "engine has it"]
    # The SP's own harvest (start token) goes to the engine's pending view, not back to the SP's feed.
    assert views.take("sp", fresh=True).tolist() == [9]
    assert fed == [[5, 3]]
    assert views.take("engine").tolist() == [7, 9]


def test_a_failed_feed_gives_the_engine_nothing() -> None:
    def feed(gfns: npt.NDArray[np.uint64]) -> None:
        raise UsageError("platform gone")

    views = DirtyViews(_FakeVm([[], [1, 2]]), feeds={"sp": feed})  # type: ignore[arg-type]
    views.start()
    with pytest.raises(UsageError, match="platform gone"):
        views.take("engine")


def test_sp_memory_writes_land_in_the_memfd_below_and_above_the_hole() -> None:
    guest = GuestMemory(3 * GIB + (64 << 20))  # sparse: region 0 below 3 GiB, region 1 from 4 GiB
    sp = SpMemory(guest)
    try:
        for gpa in (0x200000, 4 * GIB + 0x3000):
            data = os.urandom(3 * 4096)
            sp.write(gpa, data)
            assert guest.read(gpa, len(data)) == data
            assert bytes(sp.view(gpa, len(data))) == data
        with pytest.raises(UsageError):
            sp.write(3 * GIB, b"x" * 4096)  # the PCI hole is not RAM
        assert [length for _, length in sp.populated_ranges()] == [3 * 4096, 3 * 4096]
    finally:
        guest.close()


class _RewritingFirmware:
    """Opens a bundle while the 'daemon' rewrites the shared ring: what it opens must not change."""

    def __init__(self, ring: memoryview) -> None:
        self.ring = ring
        self.seen: bytes = b""

    def import_bundle(self, ref: int, bundle: Any) -> BundleType:
        before = bytes(bundle)
        self.ring[:] = b"\xee" * len(self.ring)
        assert bytes(bundle) == before
        self.seen = before
        return BundleType.MEMORY


def test_imports_open_a_private_copy_of_the_ring() -> None:
    shared = mmap.mmap(-1, 1 << 16)
    ring = _RingMap(shared)
    shared[:9] = b"CIPHERTXT"
    firmware = _RewritingFirmware(ring.view)
    assert ring.import_bundle(firmware, 1, 0, 9) is BundleType.MEMORY  # type: ignore[arg-type]
    assert firmware.seen == b"CIPHERTXT"
    with pytest.raises(UsageError, match="outside the ring"):
        ring.import_bundle(firmware, 1, (1 << 16) - 4, 9)  # type: ignore[arg-type]
    ring.close()
