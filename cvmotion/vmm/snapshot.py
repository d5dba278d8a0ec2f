"""vmm layer: the VM state format (``VmState``, versioned bytes) and snapshot files (state + sparse memory).

``VmState`` bytes::

    0x00  "CVMSTATE"        magic
    0x08  u16 version       STATE_VERSION (1)
    0x0A  u16 backend       1 = kvm, 2 = emulated
    0x0C  u32 vcpus
    0x10  u64 memory_size
    0x18  u32 body_len
    0x1C  u32 crc32         of bytes 0x00..0x1B and the body: a corruption check only; the migration
                            stream authenticates (DESIGN.md section 6)
    0x20  body              records: u16 tag | u16 index | u32 len | payload[len]

One record per field (``Tag``); ``index`` is the vCPU, IRQ chip or blob kind.  KVM payloads are the raw
``struct kvm_*`` images, so sizes are checked against ``cvmotion.abi.kvm``.  Unknown tags, duplicates,
missing vCPU fields and wrong sizes are rejected with the offset of the offending record.

Snapshot file (``save_snapshot``/``load_snapshot``)::

    "CVMSNAP1" | u32 state_len | VmState bytes | u32 nranges | nranges x (u64 gpa, u64 len)
    | zero padding to 4 KiB | the ranges' bytes, back to back

Memory is stored sparse -- only ``populated_ranges()`` -- and copied with ``copy_file_range`` between the
memfd and the file, so the data never passes through Python.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from cvmotion.abi import kvm as abi
from cvmotion.errors import MalformedStructure, UnsupportedVersion
from cvmotion.vmm.backend import BackendKind
from cvmotion.vmm.devices.cvmio import CvmIoState
from cvmotion.vmm.devices.serial import SerialState
from cvmotion.vmm.emu_backend import EmuMachineState
from cvmotion.vmm.kvm_backend import KvmMachineState
from cvmotion.vmm.layout import PAGE_SIZE
from cvmotion.vmm.memory import GuestMemory
from cvmotion.vmm.vcpu import EmuVcpuState, KvmVcpuState

__all__ = ["STATE_VERSION", "Tag", "VmState", "load_snapshot", "save_snapshot"]

STATE_VERSION = 1
_MAGIC = b"CVMSTATE"
_HEADER = struct.Struct("<8sHHIQII")
_RECORD = struct.Struct("<HHI")
_FILE_MAGIC = b"CVMSNAP1"
_BACKEND_CODES = {BackendKind.KVM: 1, BackendKind.EMULATED: 2}


class Tag(enum.IntEnum):
    CMDLINE = 0x01
    SERIAL = 0x02
    CVMIO_NEXT_TAG = 0x03
    CVMIO_BLOB = 0x04  # index = blob kind
    KVM_CLOCK = 0x10
    KVM_IRQCHIP = 0x11  # index = chip id
    VCPU_MP_STATE = 0x20  # index = vCPU for every VCPU_* record
    VCPU_REGS = 0x21
    VCPU_SREGS = 0x22
    VCPU_XSAVE = 0x23
    VCPU_XCRS = 0x24
    VCPU_DEBUGREGS = 0x25
    VCPU_LAPIC = 0x26
    VCPU_TSC_KHZ = 0x27
    VCPU_CPUID = 0x28
    VCPU_MSRS = 0x29  # kvm_msr_entry[] back to back
    VCPU_EVENTS = 0x2A
    EMU_VCPU = 0x30  # u8 started | (u8 name_len | name | u64 value)*


_KVM_FIXED = {
    Tag.VCPU_REGS: ctypes.sizeof(abi.KvmRegs),
    Tag.VCPU_SREGS: ctypes.sizeof(abi.KvmSregs),
    Tag.VCPU_XCRS: ctypes.sizeof(abi.KvmXcrs),
    Tag.VCPU_DEBUGREGS: ctypes.sizeof(abi.KvmDebugregs),
    Tag.VCPU_LAPIC: ctypes.sizeof(abi.KvmLapicState),
    Tag.VCPU_EVENTS: ctypes.sizeof(abi.KvmVcpuEvents),
    Tag.VCPU_MP_STATE: 4,
    Tag.VCPU_TSC_KHZ: 4,
    Tag.KVM_CLOCK: ctypes.sizeof(abi.KvmClockData),
    Tag.KVM_IRQCHIP: ctypes.sizeof(abi.KvmIrqchip),
}
_KVM_VCPU_TAGS = tuple(t for t in Tag if 0x20 <= t <= 0x2A)


@dataclass(frozen=True, slots=True)
class VmState:
    """Everything but guest memory: vCPUs, VM-level KVM state, devices."""

    version: int
    backend: BackendKind
    memory_size: int
    vcpus: int
    machine: KvmMachineState | EmuMachineState
    serial: SerialState
    cvmio: CvmIoState
    cmdline: str = ""

    def to_bytes(self) -> bytes:
        records: list[tuple[Tag, int, bytes]] = [(Tag.CMDLINE, 0, self.cmdline.encode())]
        s = self.serial
        records.append((Tag.SERIAL, 0, bytes([s.ier, s.lcr, s.mcr, s.scr, s.fcr, s.dll, s.dlm])))
        records.append((Tag.CVMIO_NEXT_TAG, 0, struct.pack("<I", self.cvmio.next_tag)))
        records += [(Tag.CVMIO_BLOB, kind, data) for kind, data in self.cvmio.blobs]
        m = self.machine
        if isinstance(m, KvmMachineState):
            records.append((Tag.KVM_CLOCK, 0, m.clock))
            records += [(Tag.KVM_IRQCHIP, i, chip) for i, chip in enumerate(m.irqchips)]
            for v in m.vcpus:
                msrs = b"".join(bytes(abi.KvmMsrEntry(index=i, data=d)) for i, d in v.msrs)
                records += [
                    (Tag.VCPU_MP_STATE, v.index, struct.pack("<I", v.mp_state)),
                    (Tag.VCPU_REGS, v.index, v.regs),
                    (Tag.VCPU_SREGS, v.index, v.sregs),
                    (Tag.VCPU_XSAVE, v.index, v.xsave),
                    (Tag.VCPU_XCRS, v.index, v.xcrs),
                    (Tag.VCPU_DEBUGREGS, v.index, v.debugregs),
                    (Tag.VCPU_LAPIC, v.index, v.lapic),
                    (Tag.VCPU_TSC_KHZ, v.index, struct.pack("<I", v.tsc_khz)),
                    (Tag.VCPU_CPUID, v.index, v.cpuid),
                    (Tag.VCPU_MSRS, v.index, msrs),
                    (Tag.VCPU_EVENTS, v.index, v.vcpu_events),
                ]
        else:
            for e in m.vcpus:
                body = bytes([int(e.started)]) + b"".join(
                    bytes([len(n)]) + n.encode() + struct.pack("<Q", val) for n, val in e.registers
                )
                records.append((Tag.EMU_VCPU, e.index, body))
        body = b"".join(_RECORD.pack(tag, index, len(data)) + data for tag, index, data in records)
        code = _BACKEND_CODES[self.backend]
        head = _HEADER.pack(_MAGIC, self.version, code, self.vcpus, self.memory_size, len(body), 0)[:0x1C]
        return head + struct.pack("<I", zlib.crc32(body, zlib.crc32(head))) + body

    @classmethod
    def from_bytes(cls, data: bytes) -> VmState:
        """Parse unverified state bytes.

        Raises:
            MalformedStructure: bad magic, length, checksum, record, or missing fields.
            UnsupportedVersion: a version this code does not read.
        """
        if len(data) < _HEADER.size:
            raise MalformedStructure(f"VmState: {len(data)} bytes, the header alone is {_HEADER.size:#x}")
        magic, version, backend_code, vcpus, memory_size, body_len, crc = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise MalformedStructure(f"VmState: bad magic {magic!r} at offset 0x0")
        if version != STATE_VERSION:
            raise UnsupportedVersion(f"VmState version {version} at offset 0x8; this build reads {STATE_VERSION}")
        backend = {code: kind for kind, code in _BACKEND_CODES.items()}.get(backend_code)
        if backend is None:
            raise MalformedStructure(f"VmState: unknown backend code {backend_code} at offset 0xa")
        body = data[_HEADER.size :]
        if len(body) != body_len:
            raise MalformedStructure(f"VmState: body is {len(body):#x} bytes, header at 0x18 says {body_len:#x}")
        if zlib.crc32(body, zlib.crc32(data[:0x1C])) != crc:
            raise MalformedStructure("VmState: checksum mismatch (field at 0x1c): the state is corrupted")
        if not 1 <= vcpus <= 4096:
            raise MalformedStructure(f"VmState: {vcpus} vCPUs at offset 0xc")
        records = _parse_records(body)
        return cls(
            version=version,
            backend=backend,
            memory_size=memory_size,
            vcpus=vcpus,
            machine=_kvm_machine(records, vcpus) if backend is BackendKind.KVM else _emu_machine(records, vcpus),
            serial=_serial(records),
            cvmio=CvmIoState(
                struct.unpack("<I", _one(records, Tag.CVMIO_NEXT_TAG, 0, 4))[0],
                tuple(sorted((i, d) for (t, i), d in records.items() if t == Tag.CVMIO_BLOB)),
            ),
            cmdline=_one(records, Tag.CMDLINE, 0).decode("utf-8", "replace"),
        )


def _parse_records(body: bytes) -> dict[tuple[Tag, int], bytes]:
    records: dict[tuple[Tag, int], bytes] = {}
    offset = 0
    while offset < len(body):
        at = _HEADER.size + offset
        if offset + _RECORD.size > len(body):
            raise MalformedStructure(f"VmState: truncated record header at {at:#x}")
        raw_tag, index, length = _RECORD.unpack_from(body, offset)
        try:
            tag = Tag(raw_tag)
        except ValueError as exc:
            raise MalformedStructure(f"VmState: unknown record tag {raw_tag:#x} at {at:#x}") from exc
        start = offset + _RECORD.size
        if start + length > len(body):
            raise MalformedStructure(f"VmState: record {tag.name} at {at:#x} runs past the end")
        expected = _KVM_FIXED.get(tag)
        if expected is not None and length != expected:
            raise MalformedStructure(f"VmState: record {tag.name} at {at:#x} is {length:#x} bytes, need {expected:#x}")
        if (tag, index) in records:
            raise MalformedStructure(f"VmState: duplicate record {tag.name}[{index}] at {at:#x}")
        records[(tag, index)] = body[start : start + length]
        offset = start + length
    return records


def _one(records: dict[tuple[Tag, int], bytes], tag: Tag, index: int, size: int | None = None) -> bytes:
    try:
        value = records[(tag, index)]
    except KeyError as exc:
        raise MalformedStructure(f"VmState: missing record {tag.name}[{index}]") from exc
    if size is not None and len(value) != size:
        raise MalformedStructure(f"VmState: record {tag.name}[{index}] is {len(value)} bytes, need {size}")
    return value


def _serial(records: dict[tuple[Tag, int], bytes]) -> SerialState:
    ier, lcr, mcr, scr, fcr, dll, dlm = _one(records, Tag.SERIAL, 0, 7)
    return SerialState(ier, lcr, mcr, scr, fcr, dll, dlm)


def _kvm_machine(records: dict[tuple[Tag, int], bytes], vcpus: int) -> KvmMachineState:
    chips = tuple(_one(records, Tag.KVM_IRQCHIP, chip) for chip in abi.IrqchipId)
    out = []
    for i in range(vcpus):
        f = {tag: _one(records, tag, i) for tag in _KVM_VCPU_TAGS}
        msr_blob = f[Tag.VCPU_MSRS]
        size = ctypes.sizeof(abi.KvmMsrEntry)
        if len(msr_blob) % size or len(f[Tag.VCPU_CPUID]) % ctypes.sizeof(abi.KvmCpuidEntry2):
            raise MalformedStructure(f"VmState: vCPU {i} MSR or CPUID record is not a whole number of entries")
        msrs = tuple(
            (e.index, e.data)
            for e in (abi.KvmMsrEntry.from_buffer_copy(msr_blob, o) for o in range(0, len(msr_blob), size))
        )
        try:
            mp_state = abi.MpState(struct.unpack("<I", f[Tag.VCPU_MP_STATE])[0])
        except ValueError as exc:
            raise MalformedStructure(f"VmState: vCPU {i} has an unknown MP state") from exc
        out.append(
            KvmVcpuState(
                i,
                mp_state,
                f[Tag.VCPU_REGS],
                f[Tag.VCPU_SREGS],
                f[Tag.VCPU_XSAVE],
                f[Tag.VCPU_XCRS],
                f[Tag.VCPU_DEBUGREGS],
                f[Tag.VCPU_LAPIC],
                struct.unpack("<I", f[Tag.VCPU_TSC_KHZ])[0],
                f[Tag.VCPU_CPUID],
                msrs,
                f[Tag.VCPU_EVENTS],
            )
        )
    return KvmMachineState(tuple(out), _one(records, Tag.KVM_CLOCK, 0), chips)


def _emu_machine(records: dict[tuple[Tag, int], bytes], vcpus: int) -> EmuMachineState:
    out = []
    for i in range(vcpus):
        blob = _one(records, Tag.EMU_VCPU, i)
        if not blob:
            raise MalformedStructure(f"VmState: empty EMU_VCPU[{i}] record")
        regs: list[tuple[str, int]] = []
        offset = 1
        while offset < len(blob):
            n = blob[offset]
            if offset + 1 + n + 8 > len(blob):
                raise MalformedStructure(f"VmState: EMU_VCPU[{i}] register entry at +{offset:#x} is truncated")
            name = blob[offset + 1 : offset + 1 + n].decode("ascii", "replace")
            (value,) = struct.unpack_from("<Q", blob, offset + 1 + n)
            regs.append((name, value))
            offset += 1 + n + 8
        out.append(EmuVcpuState(i, bool(blob[0]), tuple(regs)))
    return EmuMachineState(tuple(out))


def save_snapshot(path: Path, state: VmState, memory: GuestMemory) -> int:
    """Write ``state`` and the populated memory to ``path``; returns the memory bytes stored."""
    ranges = memory.populated_ranges()
    blob = state.to_bytes()
    head = _FILE_MAGIC + struct.pack("<I", len(blob)) + blob + struct.pack("<I", len(ranges))
    head += b"".join(struct.pack("<QQ", gpa, length) for gpa, length in ranges)
    data_start = -(-len(head) // PAGE_SIZE) * PAGE_SIZE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, head.ljust(data_start, b"\0"))
        out = data_start
        for gpa, length in ranges:
            _copy(memory.fd, memory.layout.offset_of(gpa, length), fd, out, length)
            out += length
    finally:
        os.close(fd)
    return sum(length for _, length in ranges)


def load_snapshot(path: Path) -> tuple[VmState, GuestMemory]:
    """Read a snapshot file into a fresh memfd.

    Raises:
        MalformedStructure: not a snapshot file, or truncated.  UnsupportedVersion.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, min(size, 1 << 20), 0)
        if head[:8] != _FILE_MAGIC or len(head) < 12:
            raise MalformedStructure(f"{path}: not a cvmotion snapshot (magic {head[:8]!r})")
        (state_len,) = struct.unpack_from("<I", head, 8)
        state = VmState.from_bytes(head[12 : 12 + state_len])
        offset = 12 + state_len
        if offset + 4 > len(head):
            raise MalformedStructure(f"{path}: range table at {offset:#x} is truncated")
        (count,) = struct.unpack_from("<I", head, offset)
        table_end = offset + 4 + 16 * count
        if table_end > len(head):
            raise MalformedStructure(f"{path}: range table at {offset:#x} is truncated")
        ranges = [struct.unpack_from("<QQ", head, offset + 4 + 16 * i) for i in range(count)]
        data = -(-table_end // PAGE_SIZE) * PAGE_SIZE
        if data + sum(length for _, length in ranges) > size:
            raise MalformedStructure(f"{path}: memory data is truncated")
        memory = GuestMemory(state.memory_size)
        try:
            for gpa, length in ranges:
                _copy(fd, data, memory.fd, memory.layout.offset_of(gpa, length), length)
                data += length
        except BaseException:
            memory.close()
            raise
        return state, memory
    finally:
        os.close(fd)


def _copy(src: int, src_offset: int, dst: int, dst_offset: int, length: int) -> None:
    """Kernel-side copy: ``copy_file_range``, or ``sendfile`` where the kernel refuses a cross-filesystem
    copy (shmem to ext4 is EXDEV on many kernels)."""
    use_sendfile = False
    while length:
        if not use_sendfile:
            try:
                done = os.copy_file_range(src, dst, length, src_offset, dst_offset)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                use_sendfile = True
                continue
        else:
            os.lseek(dst, dst_offset, os.SEEK_SET)
            done = os.sendfile(dst, src, src_offset, length)
        if done == 0:
            raise MalformedStructure("short copy: the snapshot file ends early")
        src_offset += done
        dst_offset += done
        length -= done
