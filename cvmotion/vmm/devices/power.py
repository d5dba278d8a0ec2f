"""vmm layer: the exit port -- a guest ends the VM with a status code (QEMU's ``isa-debug-exit`` convention).

The guests write a 32-bit code to port 0xF4.  QEMU offers the same with
``-device isa-debug-exit,iobase=0xf4,iosize=4`` (its process then exits with ``(code << 1) | 1``).
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["EXIT_PORT", "ExitPort"]

EXIT_PORT = 0xF4


class ExitPort:
    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self._on_exit = on_exit

    def pio_read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def pio_write(self, offset: int, size: int, value: int) -> None:
        self._on_exit(value)
