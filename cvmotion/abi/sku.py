"""abi layer: the Azure confidential VM sizes cvmotion models (DCasv5/DCadsv5, ECasv5/ECadsv5 series)
and memory-size parsing.  Sizes as published for the AMD SEV-SNP v5 series: vCPUs and GiB of memory."""

from __future__ import annotations

import re
from dataclasses import dataclass

from cvmotion.errors import UsageError

__all__ = [
    "CATALOG",
    "GIB",
    "MAX_MEMORY",
    "MIB",
    "MIN_MEMORY",
    "MAX_SKU_MEMORY",
    "MAX_SKU_VCPUS",
    "Sku",
    "find_sku",
    "format_size",
    "parse_memory",
]

# Memory sizes a VM may have: pure data that both sides of the trust line need (the host daemon checks requests,
# the VMM lays out RAM), so it lives here and not in vmm.
MIB = 1 << 20
GIB = 1 << 30
MIN_MEMORY = 4 * MIB  # kernel at 1 MiB + boot info + a working set
MAX_MEMORY = 4096 * GIB  # well above the largest SKU; a KVM slot holds at most 2**31 - 1 pages


@dataclass(frozen=True, slots=True)
class Sku:
    name: str
    series: str
    vcpus: int
    memory: int  # bytes

    @property
    def memory_gib(self) -> int:
        return self.memory // GIB


def _series(series: str, template: str, sizes: tuple[tuple[int, int], ...]) -> list[Sku]:
    return [Sku(template.format(n=v), series, v, gib * GIB) for v, gib in sizes]


_DC = ((2, 8), (4, 16), (8, 32), (16, 64), (32, 128), (48, 192), (64, 256), (96, 384))
_EC = ((2, 16), (4, 32), (8, 64), (16, 128), (20, 160), (32, 256), (48, 384), (64, 512), (96, 672))
CATALOG: dict[str, Sku] = {
    s.name: s
    for s in (
        _series("DCasv5", "Standard_DC{n}as_v5", _DC)
        + _series("DCadsv5", "Standard_DC{n}ads_v5", _DC)
        + _series("ECasv5", "Standard_EC{n}as_v5", _EC)
        + _series("ECadsv5", "Standard_EC{n}ads_v5", _EC)
        + [Sku("Standard_EC96ias_v5", "ECasv5", 96, 672 * GIB), Sku("Standard_EC96iads_v5", "ECadsv5", 96, 672 * GIB)]
    )
}


MAX_SKU_MEMORY = max(sku.memory for sku in CATALOG.values())
MAX_SKU_VCPUS = max(sku.vcpus for sku in CATALOG.values())


def find_sku(name: str) -> Sku:
    """Look a size up by name, case-insensitively, with or without the ``Standard_`` prefix.

    Raises:
        UsageError: unknown size (the message lists the known ones).
    """
    key = name.strip().lower()
    if not key.startswith("standard_"):
        key = "standard_" + key
    for sku in CATALOG.values():
        if sku.name.lower() == key:
            return sku
    raise UsageError(f"unknown VM size {name!r}; known sizes: {', '.join(CATALOG)}")


_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": MIB, "g": GIB, "t": 1 << 40}


def parse_memory(text: str) -> int:
    """``64M``, ``64MiB``, ``8G``, ``8GiB``, ``1T`` or plain bytes (binary units, like QEMU's ``-m``).

    Raises:
        UsageError: not a size, not a whole number of MiB, or outside the supported range.
    """
    m = _SIZE.match(text)
    if m is None:
        raise UsageError(f"invalid memory size {text!r}: use e.g. 64M, 8G or 8GiB")
    size = int(m.group(1)) * _UNITS[m.group(2).lower()]
    if size % MIB or not MIN_MEMORY <= size <= MAX_MEMORY:
        raise UsageError(
            f"invalid memory size {text!r}: must be a whole number of MiB between {format_size(MIN_MEMORY)} "
            f"and {format_size(MAX_MEMORY)}"
        )
    return size


def format_size(size: int) -> str:
    """Binary units: exact when whole (``8 GiB``), else one decimal (``1.0 MiB``)."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", GIB), ("MiB", MIB), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size // scale} {unit}" if size % scale == 0 else f"{size / scale:.1f} {unit}"
    return f"{size} bytes"
