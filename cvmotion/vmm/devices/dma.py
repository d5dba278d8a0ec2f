"""vmm layer: a DMA load device — writes guest memory at a configured rate, as a busy NIC or disk would.

Under this kind of nested KVM, guest code writes only ~20,000 pages/s, which never stresses a live migration's
convergence. This device writes at up to GB/s, through the VMM's own write path (``GuestMemory.write``), so the
dirty tracking sees its writes exactly as it sees cvm-io's DMA: in the VMM bitmap, harvested with the KVM log
and handed to the secure processor's dirty view.

It is configured only by the guest's command line (``dma_base=GPA dma_mib=N dma_rate=MiB/s [dma_seed=S]``),
which the launch measures: the window is memory the guest set aside for device DMA, as a confidential guest
shares a bounce buffer; the host cannot aim the device anywhere else. It writes 256 KiB runs at pseudo-random
places of the window, each 10 ms slot its share of the rate, scaled by ``(100 - throttle) %`` (the guest drives
its devices, so auto-converge slowing the vCPUs slows their DMA too). A paused VM's device is quiesced:
``quiesce()`` returns only when no write is in flight, and nothing is written until ``resume()``.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cvmotion.errors import UsageError
from cvmotion.vmm.layout import MIB, PAGE_SIZE
from cvmotion.vmm.memory import GuestMemory

__all__ = ["DmaConfig", "DmaDevice"]

RUN = 64 * PAGE_SIZE  # one DMA transfer: 256 KiB
_SLOT = 0.01  # seconds per rate slot
_ARG = re.compile(r"(?:^|\s)(dma_base|dma_mib|dma_rate|dma_seed)=(\S+)")
MAX_RATE_MIB_S = 16 * 1024


@dataclass(frozen=True, slots=True)
class DmaConfig:
    base: int
    size: int
    rate: int  # bytes per second at 0 % throttle
    seed: int = 1

    @classmethod
    def from_cmdline(cls, cmdline: str, memory: GuestMemory) -> DmaConfig | None:
        """The device's window and rate from the guest command line, or None when it asks for no device.

        Raises:
            UsageError: a malformed value, a window outside RAM or below 1 MiB, a rate out of range.
        """
        args = dict(_ARG.findall(cmdline))
        if not args:
            return None
        try:
            base = int(args["dma_base"], 0)
            mib = int(args["dma_mib"], 0)
            rate = int(args.get("dma_rate", "0"), 0)
            seed = int(args.get("dma_seed", "1"), 0)
        except (KeyError, ValueError) as exc:
            raise UsageError(f"DMA device: dma_base=GPA and dma_mib=N are required, integers ({exc})") from None
        size = mib * MIB
        if (
            base % PAGE_SIZE
            or base < MIB
            or mib < 1
            or not any(r.gpa <= base and base + size <= r.gpa + r.size for r in memory.layout.regions)
        ):
            raise UsageError(f"DMA device: window {base:#x}+{mib} MiB is not page-aligned guest RAM above 1 MiB")
        if not 0 <= rate <= MAX_RATE_MIB_S:
            raise UsageError(f"DMA device: dma_rate={rate} MiB/s (0..{MAX_RATE_MIB_S})")
        return cls(base, size, rate * MIB, seed)


class DmaDevice:
    """The device's thread; ``throttle()`` gives the current auto-converge percentage."""

    def __init__(self, memory: GuestMemory, config: DmaConfig, throttle: Callable[[], int]) -> None:
        self.memory = memory
        self.config = config
        self._throttle = throttle
        self._rng = random.Random(config.seed)
        self._data = memoryview(random.Random(config.seed ^ 0x5A5A).randbytes(RUN * 4))
        self._runs = max(1, config.size // RUN)
        self._quiet = threading.Condition()
        self._paused = True
        self._writing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.bytes_written = 0

    def start(self) -> None:
        """Start (or resume) writing."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="dma-device", daemon=True)
            self._thread.start()
        self.resume()

    def resume(self) -> None:
        with self._quiet:
            self._paused = False
            self._quiet.notify_all()

    def quiesce(self) -> None:
        """No write in flight, none until ``resume``: call before the vCPUs pause."""
        with self._quiet:
            self._paused = True
            self._quiet.wait_for(lambda: not self._writing)

    def close(self) -> None:
        self._stop.set()
        self.resume()
        if self._thread is not None:
            self._thread.join(2)

    def _loop(self) -> None:
        owed = 0.0
        last = time.monotonic()
        while not self._stop.is_set():
            with self._quiet:
                while self._paused and not self._stop.is_set():
                    self._quiet.wait(0.5)
                    last = time.monotonic()
                    owed = 0.0
                self._writing = True
            try:
                now = time.monotonic()
                owed += (now - last) * self.config.rate * (100 - self._throttle()) / 100
                last = now
                while owed >= RUN and not self._paused:
                    gpa = self.config.base + self._rng.randrange(self._runs) * RUN
                    offset = self._rng.randrange(4) * RUN
                    self.memory.write(gpa, self._data[offset : offset + RUN])
                    owed -= RUN
                    self.bytes_written += RUN
                owed = min(owed, self.config.rate * _SLOT * 4)  # a stalled slot does not become a burst
            finally:
                with self._quiet:
                    self._writing = False
                    self._quiet.notify_all()
            self._stop.wait(_SLOT)
