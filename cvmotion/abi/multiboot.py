"""abi layer: Multiboot v1 (the boot protocol of GRUB legacy and QEMU's ``-kernel``) and the ELF32 subset it reads.

Implements the Multiboot Specification version 0.6.96: the OS image header (section 3.1.1, searched for
in the first 8192 bytes of the image, 32-bit aligned), the machine state at entry (3.2: EAX =
``BOOTLOADER_MAGIC``, EBX = physical address of the information structure) and the boot information
format (3.3).  ELF structures follow the System V gABI (``Elf32_Ehdr``, ``Elf32_Phdr``).  No I/O here:
``cvmotion.vmm.loader`` places things in guest memory.
"""

from __future__ import annotations

import ctypes
import enum
import struct
from dataclasses import dataclass

from cvmotion.abi._codec import require_size
from cvmotion.errors import MalformedStructure

__all__ = [
    "BOOTLOADER_MAGIC",
    "ELFCLASS32",
    "ELFDATA2LSB",
    "ELF_MAGIC",
    "EM_386",
    "ET_EXEC",
    "HEADER_MAGIC",
    "HEADER_SEARCH_LEN",
    "PT_LOAD",
    "Elf32Ehdr",
    "Elf32Phdr",
    "HeaderFlag",
    "InfoFlag",
    "MemoryType",
    "MmapEntry",
    "MultibootHeader",
    "MultibootInfo",
]

HEADER_MAGIC = 0x1BADB002
BOOTLOADER_MAGIC = 0x2BADB002
HEADER_SEARCH_LEN = 8192  # spec 3.1.1: "must be contained completely within the first 8192 bytes"

ELF_MAGIC = b"\x7fELF"
ELFCLASS32 = 1
ELFDATA2LSB = 1
ET_EXEC = 2
EM_386 = 3
PT_LOAD = 1


class HeaderFlag(enum.IntFlag):
    """Multiboot header ``flags`` (spec 3.1.2).  Bits 0-15 are requirements: a loader that does not
    understand one must refuse the image; bits 16-31 are optional features."""

    PAGE_ALIGN = 1 << 0  # align boot modules on 4 KiB
    MEMORY_INFO = 1 << 1  # mem_* fields (and the memory map) must be provided
    VIDEO_MODE = 1 << 2  # video mode table must be provided
    AOUT_KLUDGE = 1 << 16  # load using the address fields of the header, not the ELF program headers


REQUIRED_MASK = 0x0000FFFF
SUPPORTED_REQUIRED = HeaderFlag.PAGE_ALIGN | HeaderFlag.MEMORY_INFO


class InfoFlag(enum.IntFlag):
    """Multiboot information ``flags`` (spec 3.3): which fields of the structure are valid."""

    MEMORY = 1 << 0
    BOOTDEV = 1 << 1
    CMDLINE = 1 << 2
    MODS = 1 << 3
    AOUT_SYMS = 1 << 4
    ELF_SHDR = 1 << 5
    MEM_MAP = 1 << 6
    DRIVE_INFO = 1 << 7
    CONFIG_TABLE = 1 << 8
    BOOT_LOADER_NAME = 1 << 9
    APM_TABLE = 1 << 10
    VBE_INFO = 1 << 11
    FRAMEBUFFER_INFO = 1 << 12


class MemoryType(enum.IntEnum):
    """Memory map entry ``type`` (spec 3.3; the values follow the BIOS E820 types)."""

    AVAILABLE = 1
    RESERVED = 2
    ACPI_RECLAIMABLE = 3
    NVS = 4
    BADRAM = 5


@dataclass(frozen=True, slots=True)
class MultibootHeader:
    """The OS image header, found and checksum-verified in an unverified image.

    Attributes:
        offset: file offset of the header.
        flags: the header flags.
        header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr: the a.out-kludge address
            fields (spec 3.1.3), meaningful only when ``HeaderFlag.AOUT_KLUDGE`` is set.
    """

    offset: int
    flags: HeaderFlag
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0

    @classmethod
    def find(cls, image: bytes | memoryview) -> MultibootHeader:
        """Search the first 8 KiB for magic + flags + checksum == 0 (mod 2**32), 4-byte aligned.

        Raises:
            MalformedStructure: no valid header, or one that demands a feature we do not provide.
        """
        window = bytes(image[:HEADER_SEARCH_LEN])
        for offset in range(0, len(window) - 11, 4):
            magic, flags, checksum = struct.unpack_from("<III", window, offset)
            if magic != HEADER_MAGIC or (magic + flags + checksum) & 0xFFFFFFFF:
                continue
            unsupported = flags & REQUIRED_MASK & ~int(SUPPORTED_REQUIRED)
            if unsupported:
                raise MalformedStructure(
                    f"multiboot header at {offset:#x}: requires flags {unsupported:#x} this loader does not provide"
                )
            if flags & HeaderFlag.AOUT_KLUDGE:
                if offset + 32 > len(window):
                    raise MalformedStructure(f"multiboot header at {offset:#x}: address fields truncated")
                fields = struct.unpack_from("<5I", window, offset + 12)
                return cls(offset, HeaderFlag(flags), *fields)
            return cls(offset, HeaderFlag(flags))
        raise MalformedStructure(
            f"no multiboot v1 header (magic {HEADER_MAGIC:#x}) in the first {HEADER_SEARCH_LEN} bytes"
        )


class _Struct(ctypes.LittleEndianStructure):
    _pack_ = 1
    __slots__ = ()


class MultibootInfo(_Struct):
    """The boot information structure (spec 3.3), including the 0.6.96 framebuffer fields."""

    __slots__ = ()
    _fields_ = [
        ("flags", ctypes.c_uint32),
        ("mem_lower", ctypes.c_uint32),
        ("mem_upper", ctypes.c_uint32),
        ("boot_device", ctypes.c_uint32),
        ("cmdline", ctypes.c_uint32),
        ("mods_count", ctypes.c_uint32),
        ("mods_addr", ctypes.c_uint32),
        ("syms", ctypes.c_uint32 * 4),
        ("mmap_length", ctypes.c_uint32),
        ("mmap_addr", ctypes.c_uint32),
        ("drives_length", ctypes.c_uint32),
        ("drives_addr", ctypes.c_uint32),
        ("config_table", ctypes.c_uint32),
        ("boot_loader_name", ctypes.c_uint32),
        ("apm_table", ctypes.c_uint32),
        ("vbe_control_info", ctypes.c_uint32),
        ("vbe_mode_info", ctypes.c_uint32),
        ("vbe_mode", ctypes.c_uint16),
        ("vbe_interface_seg", ctypes.c_uint16),
        ("vbe_interface_off", ctypes.c_uint16),
        ("vbe_interface_len", ctypes.c_uint16),
        ("framebuffer_addr", ctypes.c_uint64),
        ("framebuffer_pitch", ctypes.c_uint32),
        ("framebuffer_width", ctypes.c_uint32),
        ("framebuffer_height", ctypes.c_uint32),
        ("framebuffer_bpp", ctypes.c_uint8),
        ("framebuffer_type", ctypes.c_uint8),
        ("color_info", ctypes.c_uint8 * 6),
    ]


class MmapEntry(_Struct):
    """One memory map entry; ``size`` counts the bytes after itself (20), per spec 3.3."""

    __slots__ = ()
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("base_addr", ctypes.c_uint64),
        ("length", ctypes.c_uint64),
        ("type", ctypes.c_uint32),
    ]


class Elf32Ehdr(_Struct):
    """``Elf32_Ehdr`` (System V gABI, "ELF Header")."""

    __slots__ = ()
    _fields_ = [
        ("e_ident", ctypes.c_uint8 * 16),
        ("e_type", ctypes.c_uint16),
        ("e_machine", ctypes.c_uint16),
        ("e_version", ctypes.c_uint32),
        ("e_entry", ctypes.c_uint32),
        ("e_phoff", ctypes.c_uint32),
        ("e_shoff", ctypes.c_uint32),
        ("e_flags", ctypes.c_uint32),
        ("e_ehsize", ctypes.c_uint16),
        ("e_phentsize", ctypes.c_uint16),
        ("e_phnum", ctypes.c_uint16),
        ("e_shentsize", ctypes.c_uint16),
        ("e_shnum", ctypes.c_uint16),
        ("e_shstrndx", ctypes.c_uint16),
    ]


class Elf32Phdr(_Struct):
    """``Elf32_Phdr`` (System V gABI, "Program Header")."""

    __slots__ = ()
    _fields_ = [
        ("p_type", ctypes.c_uint32),
        ("p_offset", ctypes.c_uint32),
        ("p_vaddr", ctypes.c_uint32),
        ("p_paddr", ctypes.c_uint32),
        ("p_filesz", ctypes.c_uint32),
        ("p_memsz", ctypes.c_uint32),
        ("p_flags", ctypes.c_uint32),
        ("p_align", ctypes.c_uint32),
    ]


require_size(MultibootInfo, 0x74)
require_size(MmapEntry, 0x18)
require_size(Elf32Ehdr, 0x34)
require_size(Elf32Phdr, 0x20)
