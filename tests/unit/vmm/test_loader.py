"""The multiboot v1 loader against synthetic images: what it accepts, what it refuses, what it writes."""

from __future__ import annotations

import ctypes
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cvmotion.abi import multiboot as mb
from cvmotion.errors import ImageError
from cvmotion.vmm.layout import MIB
from cvmotion.vmm.loader import BOOT_INFO_GPA, load_kernel, parse_kernel
from cvmotion.vmm.memory import GuestMemory


def make_elf(
    *, flags: int = 0x3, paddr: int = 0x100000, memsz: int = 0x3000, elf_class: int = 1, header: bool = True
) -> bytes:
    """An i386 ELF executable with one PT_LOAD segment whose first bytes are a multiboot header."""
    checksum = (-(mb.HEADER_MAGIC + flags)) & 0xFFFFFFFF
    code = (struct.pack("<III", mb.HEADER_MAGIC, flags, checksum) if header else b"") + b"\x90" * 16
    ehdr = mb.Elf32Ehdr(e_type=mb.ET_EXEC, e_machine=mb.EM_386, e_version=1, e_entry=paddr + 12, e_phoff=52)
    ehdr.e_ident[:7] = [0x7F, ord("E"), ord("L"), ord("F"), elf_class, 1, 1]
    ehdr.e_ehsize, ehdr.e_phentsize, ehdr.e_phnum = 52, 32, 1
    phdr = mb.Elf32Phdr(
        p_type=mb.PT_LOAD, p_offset=0x100, p_vaddr=paddr, p_paddr=paddr, p_filesz=len(code), p_memsz=memsz
    )
    blob = bytes(ehdr) + bytes(phdr)
    return blob.ljust(0x100, b"\0") + code


def test_parses_and_loads_with_boot_information() -> None:
    image = parse_kernel(make_elf(), "k.elf")
    assert image.entry == 0x10000C
    with GuestMemory(32 * MIB) as mem:
        boot = load_kernel(mem, image, "dirty_mib=2")
        assert boot.mbi == BOOT_INFO_GPA
        assert boot.cmdline == "k.elf dirty_mib=2"
        assert mem.read(0x100000, 4) == struct.pack("<I", mb.HEADER_MAGIC)
        info = mb.MultibootInfo.from_buffer_copy(mem.read(BOOT_INFO_GPA, ctypes.sizeof(mb.MultibootInfo)))
        assert info.flags & mb.InfoFlag.MEMORY and info.flags & mb.InfoFlag.MEM_MAP  # noqa: PT018
        assert info.mem_upper == (32 * MIB - MIB) // 1024
        assert mem.read(info.cmdline, 18) == b"k.elf dirty_mib=2\0"
        entries = [
            mb.MmapEntry.from_buffer_copy(mem.read(info.mmap_addr + i, 24)) for i in range(0, info.mmap_length, 24)
        ]
        available = [(e.base_addr, e.length) for e in entries if e.type == mb.MemoryType.AVAILABLE]
        # 0x6000..0x8000 is reserved: the paravisor state page and the SNP secrets page.
        assert available == [(0, 0x6000), (0x8000, 0x9FC00 - 0x8000), (0x100000, 31 * MIB)]


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"#!/bin/sh\necho hi\n", "no multiboot v1 header"),
        (make_elf(header=False), "no multiboot v1 header"),
        (make_elf(flags=0x7), "requires flags 0x4"),
        (make_elf(elf_class=2), "needs a 32-bit ELF"),
        (make_elf()[:28] + (0x7FFF0).to_bytes(4, "little") + make_elf()[32:], "program header table"),
    ],
    ids=["text", "no-header", "video-mode", "elf64", "truncated-phdr"],
)
def test_refuses_what_is_not_a_multiboot_elf(blob: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        parse_kernel(blob, "bad")


def test_refuses_an_image_that_does_not_fit() -> None:
    image = parse_kernel(make_elf(paddr=0x100000, memsz=64 * MIB), "huge")
    with GuestMemory(16 * MIB) as mem, pytest.raises(ImageError, match="does not fit in 16 MiB"):
        load_kernel(mem, image, "")


def test_refuses_overlap_with_boot_information_and_long_cmdlines() -> None:
    low = parse_kernel(make_elf(paddr=0x8000), "low")
    with GuestMemory(16 * MIB) as mem:
        with pytest.raises(ImageError, match="overlaps the boot information"):
            load_kernel(mem, low, "")
        with pytest.raises(ImageError, match="command line"):
            load_kernel(mem, parse_kernel(make_elf(), "k"), "x" * 10000)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 380))
def test_arbitrary_images_raise_only_image_errors(noise: bytes, at: int) -> None:
    blob = bytearray(make_elf())
    blob[at : at + len(noise)] = noise  # a valid image with a random stretch overwritten
    try:
        image = parse_kernel(bytes(blob), "fuzz")
    except ImageError:
        return
    assert image.segments
