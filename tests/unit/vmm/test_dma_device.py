"""The DMA load device: writes only inside the window the guest's command line gives it, at its rate, through
the VMM write path (so the dirty tracking sees every page), and nothing while quiesced."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from cvmotion.errors import UsageError
from cvmotion.vmm.devices.dma import RUN, DmaConfig, DmaDevice
from cvmotion.vmm.layout import MIB
from cvmotion.vmm.memory import GuestMemory


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory(32 * MIB)
    yield mem
    mem.close()


def _wait(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    done = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return True
        done.wait(0.01)
    return False


def test_config_comes_from_the_command_line_and_is_checked(memory: GuestMemory) -> None:
    assert DmaConfig.from_cmdline("dirty_mib=2 rate=0", memory) is None
    cfg = DmaConfig.from_cmdline("memdirty dma_base=0x1000000 dma_mib=4 dma_rate=100 dma_seed=3", memory)
    assert cfg == DmaConfig(0x1000000, 4 * MIB, 100 * MIB, 3)
    for bad in ("dma_base=0x1000000", "dma_base=0x1000001 dma_mib=1", "dma_base=0 dma_mib=1",
                "dma_base=0x1f00000 dma_mib=4", "dma_base=0x1000000 dma_mib=1 dma_rate=99999999",
                "dma_base=zz dma_mib=1"):  # fmt: skip
        with pytest.raises(UsageError, match="DMA device"):
            DmaConfig.from_cmdline(bad, memory)


def test_writes_land_in_the_window_and_in_the_vmm_dirty_bitmap(memory: GuestMemory) -> None:
    cfg = DmaConfig(0x1000000, 4 * MIB, 200 * MIB)
    device = DmaDevice(memory, cfg, lambda: 0)
    memory.vmm_dirty.take()
    device.start()
    try:
        assert _wait(lambda: device.bytes_written >= 4 * RUN)
        device.quiesce()
        written = device.bytes_written
        dirty = memory.vmm_dirty.take().gfns()
        assert len(dirty) > 0
        assert int(dirty.min()) >= cfg.base >> 12
        assert int(dirty.max()) < (cfg.base + cfg.size) >> 12
        # Quiesced: nothing more is written (the window a paused VM's device would have to stay silent).
        threading.Event().wait(0.1)
        assert device.bytes_written == written
        assert len(memory.vmm_dirty.take().gfns()) == 0
        device.resume()
        assert _wait(lambda: device.bytes_written > written)
    finally:
        device.close()
    window = np.frombuffer(memory.view(cfg.base, cfg.size), dtype=np.uint8)
    assert window.any()
    assert not np.frombuffer(memory.view(0, cfg.base), dtype=np.uint8).any()


def test_throttle_slows_the_device(memory: GuestMemory) -> None:
    throttle = [99]
    device = DmaDevice(memory, DmaConfig(0x1000000, 4 * MIB, 400 * MIB), lambda: throttle[0])
    device.start()
    try:
        threading.Event().wait(0.2)
        slow = device.bytes_written
        throttle[0] = 0
        assert _wait(lambda: device.bytes_written > slow + 40 * RUN)
    finally:
        device.close()
    assert slow <= 0.2 * 400 * MIB * 0.01 * 2 + RUN  # at most ~1 % of the rate while throttled 99 %
