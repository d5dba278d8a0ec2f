"""abi layer: little helpers shared by the byte-exact formats (length, must-be-zero, ctypes size pins)."""

from __future__ import annotations

import ctypes

from cvmotion.errors import MalformedStructure, ReservedNotZero

__all__ = ["require_len", "require_size", "require_zero", "zero_ranges"]


def require_size(cls: type[ctypes.Structure], size: int) -> None:
    """Pin a ctypes layout's size at import time (the Python twin of virtee's ``const_assert!``)."""
    actual = ctypes.sizeof(cls)
    if actual != size:
        raise MalformedStructure(f"{cls.__name__} is {actual:#x} bytes, the spec says {size:#x}")


def require_len(structure: str, data: bytes | bytearray | memoryview, size: int) -> None:
    """Reject a buffer that is not exactly ``size`` bytes long."""
    if len(data) != size:
        raise MalformedStructure(f"{structure}: expected {size:#x} bytes, got {len(data):#x}")


def require_zero(structure: str, data: bytes | bytearray | memoryview, lo: int, hi: int) -> None:
    """Reject non-zero bytes in the half-open range ``[lo, hi)`` (go-sev-guest ``mbz``)."""
    if any(data[lo:hi]):
        raise ReservedNotZero(structure, lo, hi)


def zero_ranges(structure: str, data: bytes | bytearray | memoryview, ranges: tuple[tuple[int, int], ...]) -> None:
    """``require_zero`` over several ranges, reporting the first offender."""
    for lo, hi in ranges:
        require_zero(structure, data, lo, hi)
