"""A VM process's pause stops its DMA load device: once ``pause`` returns, the device writes nothing (the SP's
switchover seals guest memory after its one harvest, so a device still writing would leave stale pages that the
start token's own harvest then has to catch)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import cast

from cvmotion.vmd.process import VmProcess
from cvmotion.vmd.protocol import VmSpec
from cvmotion.vmm.devices.dma import DmaConfig, DmaDevice
from cvmotion.vmm.layout import MIB
from cvmotion.vmm.memory import GuestMemory
from cvmotion.vmm.vm import Vm

SLOT = 0.01  # the device's rate slot


class _PausableVm:
    def pause(self) -> float:
        return 0.0


def test_pause_returns_only_with_the_dma_device_quiet(tmp_path: Path) -> None:
    memory = GuestMemory(32 * MIB)
    cmdline = "dma_base=0x800000 dma_mib=4 dma_rate=400"
    proc = VmProcess(VmSpec(name="dma", memory=32 * MIB, cmdline=cmdline), tmp_path, str(tmp_path / "p.sock"))
    config = DmaConfig.from_cmdline(cmdline, memory)
    assert config is not None
    device = DmaDevice(memory, config, lambda: 0)
    proc.vm, proc.dma = cast(Vm, _PausableVm()), device
    tick = threading.Event()
    try:
        device.start()
        device.resume()
        for _ in range(1000):  # bounded: the device writes within its first slots
            if device.bytes_written:
                break
            tick.wait(SLOT)
        assert device.bytes_written, "the device never wrote"
        proc.pause()
        written = device.bytes_written
        for _ in range(20):  # 20 slots of 4 KiB+ each at 400 MiB/s: a running device would have written
            tick.wait(SLOT)
            assert device.bytes_written == written
    finally:
        device.close()
        proc.vm = None
        memory.close()
