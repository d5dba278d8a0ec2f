"""vmm layer: COM1 -- a 16550A UART reduced to what a polled console needs, and the console it feeds.

The transmitter is always ready (LSR reports THRE|TEMT), so guests never wait; received data is never
available.  Register state that a guest programs (divisor, line/modem control, scratch) is kept and is
part of the snapshot, as Firecracker's serial device does.
"""

from __future__ import annotations

import collections
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["COM1_BASE", "COM1_PORTS", "Console", "Serial", "SerialState"]

COM1_BASE = 0x3F8
COM1_PORTS = 8
_LSR_THRE_TEMT = 0x60
_DLAB = 0x80
_MAX_LINE = 4096


class Console:
    """Lines the guest printed: a bounded history, live subscribers, and ``wait_for`` for tests and tools."""

    def __init__(self, history: int = 20000) -> None:
        self._partial = bytearray()
        self._lines: collections.deque[str] = collections.deque(maxlen=history)
        self._count = 0
        self._cond = threading.Condition()
        self._subscribers: list[Callable[[str], None]] = []

    def subscribe(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(line)`` (from a vCPU thread) for every completed line."""
        self._subscribers.append(callback)

    def feed(self, data: bytes) -> None:
        self._partial += data
        lines: list[str] = []
        while True:
            nl = self._partial.find(b"\n")
            if nl < 0:
                if len(self._partial) > _MAX_LINE:  # a guest that never prints a newline stays bounded
                    nl = _MAX_LINE
                else:
                    break
            lines.append(self._partial[:nl].decode("utf-8", "replace").rstrip("\r"))
            del self._partial[: nl + 1]
        if not lines:
            return
        with self._cond:
            self._lines.extend(lines)
            self._count += len(lines)
            self._cond.notify_all()
        for line in lines:
            for callback in self._subscribers:
                callback(line)

    @property
    def line_count(self) -> int:
        """Lines printed so far (an index for ``wait_for(since=...)``)."""
        return self._count

    def lines(self) -> list[str]:
        with self._cond:
            return list(self._lines)

    def wait_for(self, pattern: str, timeout: float, since: int = 0) -> re.Match[str] | None:
        """The first line numbered ``>= since`` matching ``pattern``, waiting up to ``timeout`` seconds."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                first = self._count - len(self._lines)
                for i, line in enumerate(self._lines):
                    if first + i >= since and (m := regex.search(line)):
                        return m
                since = max(since, self._count)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._cond.wait(remaining):
                    return None

    def collect(self, pattern: str, count: int, timeout: float, since: int = 0) -> list[str]:
        """The first ``count`` lines numbered ``>= since`` matching ``pattern`` (fewer if ``timeout`` passes)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                first = self._count - len(self._lines)
                found = [line for i, line in enumerate(self._lines) if first + i >= since and regex.search(line)]
                remaining = deadline - time.monotonic()
                if len(found) >= count or remaining <= 0:
                    return found[:count]
                self._cond.wait(remaining)


@dataclass(frozen=True, slots=True)
class SerialState:
    ier: int = 0
    lcr: int = 0
    mcr: int = 0
    scr: int = 0
    fcr: int = 0
    dll: int = 1
    dlm: int = 0


class Serial:
    """The UART at COM1; transmitted bytes go to ``console``."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._s = SerialState()

    def pio_read(self, offset: int, size: int) -> int:
        s = self._s
        dlab = s.lcr & _DLAB
        return {
            0: s.dll if dlab else 0,  # RBR: nothing received
            1: s.dlm if dlab else s.ier,
            2: 0xC1 if s.fcr & 1 else 0x01,  # IIR: no interrupt pending (FIFOs enabled bits)
            3: s.lcr,
            4: s.mcr,
            5: _LSR_THRE_TEMT,
            6: 0xB0,  # MSR: CTS, DSR, DCD
            7: s.scr,
        }.get(offset, 0xFF)

    def pio_write(self, offset: int, size: int, value: int) -> None:
        s = self._s
        value &= 0xFF
        dlab = s.lcr & _DLAB
        if offset == 0 and not dlab:
            self.console.feed(bytes([value]))
            return
        field = {0: "dll", 1: "dlm" if dlab else "ier", 2: "fcr", 3: "lcr", 4: "mcr", 7: "scr"}.get(offset)
        if field is not None:
            self._s = SerialState(**{**_asdict(s), field: value})

    def write_bytes(self, data: bytes) -> None:
        """Fast path for ``rep outsb`` to THR: one KVM exit carries many bytes."""
        self.console.feed(data)

    def save(self) -> SerialState:
        return self._s

    def restore(self, state: SerialState) -> None:
        self._s = state


def _asdict(s: SerialState) -> dict[str, int]:
    return {"ier": s.ier, "lcr": s.lcr, "mcr": s.mcr, "scr": s.scr, "fcr": s.fcr, "dll": s.dll, "dlm": s.dlm}
