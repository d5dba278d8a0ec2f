"""vmm layer: the multiboot v1 loader -- ELF32 kernel images into guest memory, plus the boot information.

What a multiboot loader must do (Multiboot Specification 0.6.96, sections 3.1-3.3) and what QEMU's
``-kernel`` does for a multiboot ELF: find and verify the header in the first 8 KiB, load the PT_LOAD
segments at their physical addresses (or the a.out-kludge ranges when header flag 16 is set), zero
the BSS, and build the information structure (memory sizes, a BIOS-style memory map, the command line,
the loader name) in low memory.  Entry state (EAX/EBX, flat protected mode) is set by the backend.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

from cvmotion.abi import multiboot as mb
from cvmotion.errors import ImageError, MalformedStructure
from cvmotion.vmm.layout import MIB, Gpa
from cvmotion.vmm.memory import GuestMemory

__all__ = [
    "BOOT_INFO_END",
    "BOOT_INFO_GPA",
    "SECRETS_PAGE_GPA",
    "BootInfo",
    "KernelImage",
    "Segment",
    "load_kernel",
    "parse_kernel",
    "read_kernel",
]

PARAVISOR_START = 0x6000  # paravisor state page (0x6000) and SNP secrets page (0x7000)
PARAVISOR_END = 0x8000
# The SNP secrets page: fixed, so the launch measures it at one known GPA and a host cannot have the SP write
# it over any other page.
SECRETS_PAGE_GPA = PARAVISOR_START + 0x1000
BOOT_INFO_GPA = 0x9000  # MBI, memory map, loader name, command line: two pages of conventional memory
BOOT_INFO_END = 0xB000
EBDA_START = 0x9FC00  # conventional memory ends where a PC's extended BIOS data area begins
BIOS_START = 0xF0000
LOADER_NAME = b"cvmotion\0"
MAX_CMDLINE = BOOT_INFO_END - BOOT_INFO_GPA - 0x200


@dataclass(frozen=True, slots=True)
class Segment:
    """Bytes to place at ``gpa``, followed by ``memsz - len(data)`` zero bytes (BSS)."""

    gpa: Gpa
    data: bytes
    memsz: int

    @property
    def end(self) -> int:
        return self.gpa + self.memsz


@dataclass(frozen=True, slots=True)
class KernelImage:
    """A parsed, not yet loaded, multiboot kernel."""

    name: str
    entry: Gpa
    segments: tuple[Segment, ...]
    header: mb.MultibootHeader

    @property
    def end(self) -> int:
        return max(s.end for s in self.segments)


@dataclass(frozen=True, slots=True)
class BootInfo:
    """Where the loader put things: the vCPU starts at ``entry`` with EAX = magic, EBX = ``mbi``."""

    entry: Gpa
    mbi: Gpa
    kernel_end: int
    cmdline: str


def parse_kernel(data: bytes, name: str) -> KernelImage:
    """Parse an unverified image.

    Raises:
        ImageError: not a 32-bit little-endian i386 ELF executable with a valid multiboot v1 header.
    """
    try:
        header = mb.MultibootHeader.find(data)
    except MalformedStructure as exc:
        raise ImageError(f"{name}: not a multiboot kernel: {exc}") from exc
    if header.flags & mb.HeaderFlag.AOUT_KLUDGE:
        return _parse_aout_kludge(data, name, header)
    return _parse_elf(data, name, header)


def _parse_elf(data: bytes, name: str, header: mb.MultibootHeader) -> KernelImage:
    ehdr_size = ctypes.sizeof(mb.Elf32Ehdr)
    if len(data) < ehdr_size or data[:4] != mb.ELF_MAGIC:
        raise ImageError(f"{name}: not an ELF file (magic {data[:4].hex() or 'missing'}) and no a.out-kludge header")
    ehdr = mb.Elf32Ehdr.from_buffer_copy(data)
    if ehdr.e_ident[4] != mb.ELFCLASS32:
        raise ImageError(f"{name}: ELF class {ehdr.e_ident[4]} at offset 0x4: multiboot v1 needs a 32-bit ELF")
    if ehdr.e_ident[5] != mb.ELFDATA2LSB or ehdr.e_machine != mb.EM_386 or ehdr.e_type != mb.ET_EXEC:
        raise ImageError(
            f"{name}: need a little-endian i386 executable (e_machine {ehdr.e_machine}, e_type {ehdr.e_type})"
        )
    phsize = ctypes.sizeof(mb.Elf32Phdr)
    if ehdr.e_phentsize != phsize or ehdr.e_phoff + ehdr.e_phnum * phsize > len(data):
        raise ImageError(f"{name}: program header table at {ehdr.e_phoff:#x} is malformed or truncated")
    segments: list[Segment] = []
    for i in range(ehdr.e_phnum):
        ph = mb.Elf32Phdr.from_buffer_copy(data, ehdr.e_phoff + i * phsize)
        if ph.p_type != mb.PT_LOAD or ph.p_memsz == 0:
            continue
        if ph.p_filesz > ph.p_memsz or ph.p_offset + ph.p_filesz > len(data):
            raise ImageError(f"{name}: segment {i} (file offset {ph.p_offset:#x}) lies outside the file")
        if ph.p_paddr + ph.p_memsz > 1 << 32:
            raise ImageError(f"{name}: segment {i} at {ph.p_paddr:#x} extends past 4 GiB")
        segments.append(Segment(Gpa(ph.p_paddr), data[ph.p_offset : ph.p_offset + ph.p_filesz], ph.p_memsz))
    if not segments:
        raise ImageError(f"{name}: no loadable segments")
    return KernelImage(name, Gpa(ehdr.e_entry), tuple(segments), header)


def _parse_aout_kludge(data: bytes, name: str, h: mb.MultibootHeader) -> KernelImage:
    # Spec 3.1.3: file offset of load_addr = header offset - (header_addr - load_addr).
    start = h.offset - (h.header_addr - h.load_addr)
    load_end = h.load_end_addr or h.load_addr + (len(data) - start)
    bss_end = max(h.bss_end_addr, load_end)
    if (
        start < 0
        or h.load_addr > h.header_addr
        or load_end < h.load_addr
        or start + (load_end - h.load_addr) > len(data)
    ):
        raise ImageError(
            f"{name}: a.out-kludge addresses (load {h.load_addr:#x}, header {h.header_addr:#x}) are inconsistent"
        )
    seg = Segment(Gpa(h.load_addr), data[start : start + (load_end - h.load_addr)], bss_end - h.load_addr)
    return KernelImage(name, Gpa(h.entry_addr), (seg,), h)


def read_kernel(path: Path) -> KernelImage:
    """Read and parse an image file.

    Raises:
        ImageError: unreadable, or not a multiboot kernel.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"{path}: {exc.strerror or exc}") from exc
    return parse_kernel(data, path.name)


def load_kernel(memory: GuestMemory, image: KernelImage, cmdline: str) -> BootInfo:
    """Copy the image and the boot information into guest memory.

    Raises:
        ImageError: a segment does not fit in low RAM or overlaps the boot information; cmdline too long.
    """
    low_end = memory.layout.low_size
    for seg in image.segments:
        if seg.end > low_end:
            raise ImageError(
                f"{image.name}: segment {seg.gpa:#x}..{seg.end:#x} does not fit in {memory.size // MIB} MiB of "
                f"guest RAM (low RAM ends at {low_end:#x})"
            )
        if seg.gpa < BOOT_INFO_END and seg.end > BOOT_INFO_GPA:
            raise ImageError(
                f"{image.name}: segment {seg.gpa:#x}..{seg.end:#x} overlaps the boot information at "
                f"{BOOT_INFO_GPA:#x}..{BOOT_INFO_END:#x}"
            )
    full_cmdline = f"{image.name} {cmdline}".strip().encode() + b"\0"
    if len(full_cmdline) > MAX_CMDLINE:
        raise ImageError(f"command line is {len(full_cmdline)} bytes, at most {MAX_CMDLINE} fit")
    for seg in image.segments:
        memory.write(seg.gpa, seg.data)
        # BSS: a fresh memfd reads as zero already; writing zeros would only populate pages.

    mmap_entries = [
        (0, PARAVISOR_START, mb.MemoryType.AVAILABLE),
        # The paravisor's state page and the SNP secrets page: guest-private, but not for the guest OS.
        (PARAVISOR_START, PARAVISOR_END - PARAVISOR_START, mb.MemoryType.RESERVED),
        (PARAVISOR_END, EBDA_START - PARAVISOR_END, mb.MemoryType.AVAILABLE),
        (EBDA_START, 0xA0000 - EBDA_START, mb.MemoryType.RESERVED),
        (BIOS_START, 0x100000 - BIOS_START, mb.MemoryType.RESERVED),
        (0x100000, low_end - 0x100000, mb.MemoryType.AVAILABLE),
        *[(r.gpa, r.size, mb.MemoryType.AVAILABLE) for r in memory.layout.regions[1:]],
    ]
    entry_size = ctypes.sizeof(mb.MmapEntry)
    mmap_gpa = BOOT_INFO_GPA + ctypes.sizeof(mb.MultibootInfo)
    mmap_blob = b"".join(
        bytes(mb.MmapEntry(size=entry_size - 4, base_addr=base, length=length, type=kind))
        for base, length, kind in mmap_entries
    )
    name_gpa = mmap_gpa + len(mmap_blob)
    cmdline_gpa = name_gpa + len(LOADER_NAME)
    info = mb.MultibootInfo(
        flags=mb.InfoFlag.MEMORY | mb.InfoFlag.CMDLINE | mb.InfoFlag.MEM_MAP | mb.InfoFlag.BOOT_LOADER_NAME,
        mem_lower=EBDA_START // 1024,
        mem_upper=min((low_end - 0x100000) // 1024, 0xFFFFFFFF),
        cmdline=cmdline_gpa,
        mmap_length=len(mmap_blob),
        mmap_addr=mmap_gpa,
        boot_loader_name=name_gpa,
    )
    memory.write(BOOT_INFO_GPA, bytes(info) + mmap_blob + LOADER_NAME + full_cmdline)
    kernel_end = (image.end + 0xFFF) & ~0xFFF
    return BootInfo(image.entry, Gpa(BOOT_INFO_GPA), kernel_end, full_cmdline[:-1].decode())
