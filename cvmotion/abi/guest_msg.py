"""abi layer: SNP guest messages: the message header and the report/key request and response payloads.

Implements the SEV-SNP Firmware ABI "Message Header" table (0x60 bytes; AES-256-GCM, the AAD is header
bytes 0x30-0x5F, the IV is MSG_SEQNO as a little-endian 96-bit value), MSG_REPORT_REQ / MSG_REPORT_RSP and
MSG_KEY_REQ / MSG_KEY_RSP.  Encryption itself happens in the firmware and in the guest; this module only
lays bytes out.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from cvmotion.abi._codec import require_len, zero_ranges
from cvmotion.errors import MalformedStructure, UnsupportedVersion

__all__ = [
    "AEAD_ALGO_AES_256_GCM",
    "HEADER_SIZE",
    "MAX_PAYLOAD",
    "GuestFieldSelect",
    "GuestMsgHeader",
    "KeyReq",
    "KeyRsp",
    "MsgType",
    "ReportReq",
    "ReportRsp",
    "RootKey",
]

HEADER_SIZE = 0x60
AEAD_ALGO_AES_256_GCM = 1
HDR_VERSION = 1
MAX_PAYLOAD = 0x1000 - HEADER_SIZE  # one shared page holds header and payload
AAD_SLICE = slice(0x30, 0x60)


class MsgType(enum.IntEnum):
    """MSG_TYPE values (SNP ABI, "Message Type Encodings")."""

    INVALID = 0
    CPUID_REQ = 1
    CPUID_RSP = 2
    KEY_REQ = 3
    KEY_RSP = 4
    REPORT_REQ = 5
    REPORT_RSP = 6
    EXPORT_REQ = 7
    EXPORT_RSP = 8
    IMPORT_REQ = 9
    IMPORT_RSP = 10
    ABSORB_REQ = 11
    ABSORB_RSP = 12
    VMRK_REQ = 13
    VMRK_RSP = 14
    ABSORB_NOMA_REQ = 15
    ABSORB_NOMA_RSP = 16
    TSC_INFO_REQ = 17
    TSC_INFO_RSP = 18


_HEADER = struct.Struct("<32sQ8sBBHBBHIB35s")
assert _HEADER.size == HEADER_SIZE  # module invariant


@dataclass(frozen=True, slots=True)
class GuestMsgHeader:
    """SNP_GUEST_MSG_HDR. ``authtag`` holds the 16-byte GCM tag in its first 16 bytes."""

    authtag: bytes
    msg_seqno: int
    msg_type: MsgType
    msg_size: int
    msg_vmpck: int = 0
    msg_version: int = 1
    algo: int = AEAD_ALGO_AES_256_GCM
    hdr_version: int = HDR_VERSION
    hdr_size: int = HEADER_SIZE

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> GuestMsgHeader:
        data = bytes(data)
        require_len("SNP_GUEST_MSG_HDR", data, HEADER_SIZE)
        zero_ranges("SNP_GUEST_MSG_HDR", data, ((0x28, 0x30), (0x38, 0x3C), (0x3D, 0x60)))
        (tag, seqno, _r0, algo, hdr_version, hdr_size, msg_type, msg_version, msg_size, _r1, vmpck, _r2) = (
            _HEADER.unpack(data)
        )
        if hdr_version != HDR_VERSION:
            raise UnsupportedVersion(f"SNP_GUEST_MSG_HDR.HDR_VERSION {hdr_version} is not supported (1)")
        if hdr_size != HEADER_SIZE:
            raise MalformedStructure(f"SNP_GUEST_MSG_HDR.HDR_SIZE {hdr_size:#x} (expected {HEADER_SIZE:#x})")
        if algo != AEAD_ALGO_AES_256_GCM:
            raise MalformedStructure(f"SNP_GUEST_MSG_HDR.ALGO {algo} is not AES-256-GCM (1)")
        if msg_size > MAX_PAYLOAD:
            raise MalformedStructure(f"SNP_GUEST_MSG_HDR.MSG_SIZE {msg_size:#x} exceeds {MAX_PAYLOAD:#x}")
        if vmpck > 3:
            raise MalformedStructure(f"SNP_GUEST_MSG_HDR.MSG_VMPCK {vmpck} (0..3)")
        try:
            kind = MsgType(msg_type)
        except ValueError:
            raise MalformedStructure(f"SNP_GUEST_MSG_HDR.MSG_TYPE {msg_type} is unknown") from None
        return cls(
            authtag=tag,
            msg_seqno=seqno,
            msg_type=kind,
            msg_size=msg_size,
            msg_vmpck=vmpck,
            msg_version=msg_version,
            algo=algo,
            hdr_version=hdr_version,
            hdr_size=hdr_size,
        )

    def to_bytes(self) -> bytes:
        if len(self.authtag) != 32:
            raise MalformedStructure("SNP_GUEST_MSG_HDR.AUTHTAG must be 32 bytes")
        return _HEADER.pack(
            self.authtag,
            self.msg_seqno,
            b"",
            self.algo,
            self.hdr_version,
            self.hdr_size,
            int(self.msg_type),
            self.msg_version,
            self.msg_size,
            0,
            self.msg_vmpck,
            b"",
        )

    def aad(self) -> bytes:
        """Header bytes 0x30-0x5F: the additional authenticated data."""
        return self.to_bytes()[AAD_SLICE]

    def iv(self) -> bytes:
        """The 96-bit GCM IV: MSG_SEQNO little-endian, upper four bytes zero."""
        return self.msg_seqno.to_bytes(12, "little")


_REPORT_REQ = struct.Struct("<64sII24s")


@dataclass(frozen=True, slots=True)
class ReportReq:
    """MSG_REPORT_REQ payload (0x60 bytes). ``key_sel``: 0 either key, 1 VCEK, 2 VLEK."""

    report_data: bytes
    vmpl: int = 0
    key_sel: int = 0

    SIZE = 0x60

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> ReportReq:
        data = bytes(data)
        require_len("MSG_REPORT_REQ", data, cls.SIZE)
        zero_ranges("MSG_REPORT_REQ", data, ((0x48, 0x60),))
        report_data, vmpl, sel, _ = _REPORT_REQ.unpack(data)
        if sel >> 2:
            raise MalformedStructure(f"MSG_REPORT_REQ.KEY_SEL {sel:#x}: bits 31:2 must be zero")
        if sel == 3:
            raise MalformedStructure("MSG_REPORT_REQ.KEY_SEL 3 is reserved")
        return cls(report_data=report_data, vmpl=vmpl, key_sel=sel)

    def to_bytes(self) -> bytes:
        if len(self.report_data) != 64:
            raise MalformedStructure("MSG_REPORT_REQ.REPORT_DATA must be 64 bytes")
        return _REPORT_REQ.pack(self.report_data, self.vmpl, self.key_sel, b"")


_RSP_HEAD = struct.Struct("<II24s")


@dataclass(frozen=True, slots=True)
class ReportRsp:
    """MSG_REPORT_RSP payload: status, report size and the report itself."""

    status: int
    report: bytes

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> ReportRsp:
        data = bytes(data)
        if len(data) < _RSP_HEAD.size:
            raise MalformedStructure(f"MSG_REPORT_RSP: {len(data):#x} bytes is shorter than its header")
        zero_ranges("MSG_REPORT_RSP", data, ((0x08, 0x20),))
        status, size, _ = _RSP_HEAD.unpack_from(data)
        body = data[_RSP_HEAD.size :]
        if len(body) != size:
            raise MalformedStructure(f"MSG_REPORT_RSP.REPORT_SIZE {size:#x} but {len(body):#x} bytes follow")
        return cls(status=status, report=body)

    def to_bytes(self) -> bytes:
        return _RSP_HEAD.pack(self.status, len(self.report), b"") + self.report


class RootKey(enum.IntEnum):
    """MSG_KEY_REQ.ROOT_KEY_SELECT bit 0."""

    VCEK = 0
    VMRK = 1


class GuestFieldSelect(enum.IntFlag):
    """MSG_KEY_REQ.GUEST_FIELD_SELECT: which guest fields are mixed into the derived key."""

    GUEST_POLICY = 1 << 0
    IMAGE_ID = 1 << 1
    FAMILY_ID = 1 << 2
    MEASUREMENT = 1 << 3
    GUEST_SVN = 1 << 4
    TCB_VERSION = 1 << 5
    LAUNCH_MIT_VECTOR = 1 << 6


_KEY_REQ = struct.Struct("<IIQIIQ")


@dataclass(frozen=True, slots=True)
class KeyReq:
    """MSG_KEY_REQ payload (0x20 bytes)."""

    root_key: RootKey = RootKey.VCEK
    key_sel: int = 0
    guest_field_select: GuestFieldSelect = GuestFieldSelect(0)
    vmpl: int = 0
    guest_svn: int = 0
    tcb_version: int = 0

    SIZE = 0x20

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> KeyReq:
        data = bytes(data)
        require_len("MSG_KEY_REQ", data, cls.SIZE)
        zero_ranges("MSG_KEY_REQ", data, ((0x04, 0x08),))
        select, _, fields, vmpl, svn, tcb = _KEY_REQ.unpack(data)
        if select >> 3:
            raise MalformedStructure(f"MSG_KEY_REQ.ROOT_KEY_SELECT {select:#x}: bits 31:3 must be zero")
        if fields >> 7:
            raise MalformedStructure(f"MSG_KEY_REQ.GUEST_FIELD_SELECT {fields:#x}: bits 63:7 must be zero")
        key_sel = (select >> 1) & 0x3
        if key_sel == 3:
            raise MalformedStructure("MSG_KEY_REQ.KEY_SEL 3 is reserved")
        return cls(
            root_key=RootKey(select & 1),
            key_sel=key_sel,
            guest_field_select=GuestFieldSelect(fields),
            vmpl=vmpl,
            guest_svn=svn,
            tcb_version=tcb,
        )

    def to_bytes(self) -> bytes:
        select = int(self.root_key) | (self.key_sel << 1)
        return _KEY_REQ.pack(select, 0, int(self.guest_field_select), self.vmpl, self.guest_svn, self.tcb_version)


_KEY_RSP = struct.Struct("<I28s32s")


@dataclass(frozen=True, slots=True)
class KeyRsp:
    """MSG_KEY_RSP payload (0x40 bytes): status and the 32-byte derived key."""

    status: int
    derived_key: bytes

    SIZE = 0x40

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> KeyRsp:
        data = bytes(data)
        require_len("MSG_KEY_RSP", data, cls.SIZE)
        zero_ranges("MSG_KEY_RSP", data, ((0x04, 0x20),))
        status, _, key = _KEY_RSP.unpack(data)
        return cls(status=status, derived_key=key)

    def to_bytes(self) -> bytes:
        if len(self.derived_key) != 32:
            raise MalformedStructure("MSG_KEY_RSP.DERIVED_KEY must be 32 bytes")
        return _KEY_RSP.pack(self.status, b"", self.derived_key)
