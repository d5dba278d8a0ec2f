"""vmm layer: the x86 port I/O bus -- which device answers which port, and what an empty port does.

An unassigned port behaves as on a PC: reads float high (all ones), writes vanish.  The guests rely on
that to detect a missing cvm-io device, exactly as they would under QEMU.
"""

from __future__ import annotations

import bisect
from typing import Protocol

from cvmotion.errors import UsageError

__all__ = ["IoBus", "PioDevice"]


class PioDevice(Protocol):
    """A device on the port I/O bus; ``offset`` is relative to the base it was registered at."""

    def pio_read(self, offset: int, size: int) -> int: ...

    def pio_write(self, offset: int, size: int, value: int) -> None: ...


class IoBus:
    def __init__(self) -> None:
        self._bases: list[int] = []
        self._ranges: list[tuple[int, int, PioDevice]] = []

    def register(self, base: int, count: int, device: PioDevice) -> None:
        for lo, n, _ in self._ranges:
            if base < lo + n and lo < base + count:
                raise UsageError(f"ports {base:#x}..{base + count - 1:#x} overlap a device at {lo:#x}")
        i = bisect.bisect(self._bases, base)
        self._bases.insert(i, base)
        self._ranges.insert(i, (base, count, device))

    def _find(self, port: int) -> tuple[int, PioDevice] | None:
        i = bisect.bisect(self._bases, port) - 1
        if i >= 0:
            base, count, device = self._ranges[i]
            if port < base + count:
                return base, device
        return None

    def read(self, port: int, size: int) -> int:
        hit = self._find(port)
        if hit is None:
            return (1 << (8 * size)) - 1
        return hit[1].pio_read(port - hit[0], size) & ((1 << (8 * size)) - 1)

    def write(self, port: int, size: int, value: int) -> None:
        hit = self._find(port)
        if hit is not None:
            hit[1].pio_write(port - hit[0], size, value)
