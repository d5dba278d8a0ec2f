"""abi layer: SNP guest messages: the message header and the report/key request and response payloads.

Implements the SEV-SNP Firmware ABI "Message Header" table (0x60 bytes; AES-256-GCM, the AAD is header
bytes 0x30-0x5F, the IV is MSG_SEQNO as a little-endian 96-bit value), MSG_REPORT_REQ / MSG_REPORT_RSP and
MSG_KEY_REQ / MSG_KEY_RSP, and the one AEAD both ends use: ``seal_guest_message`` / ``open_guest_message``
(the firmware and the guest's paravisor call the same two functions, so they cannot disagree on the AAD or
the IV), plus ``GuestChannel``, the guest side's sequence-number bookkeeping.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cvmotion.abi._codec import require_len, zero_ranges
from cvmotion.errors import AbiError, IntegrityError, MalformedStructure, UnsupportedVersion

__all__ = [
    "AEAD_ALGO_AES_256_GCM",
    "HEADER_SIZE",
    "MAX_PAYLOAD",
    "MAX_SEQNO",
    "GuestChannel",
    "GuestFieldSelect",
    "GuestMsgHeader",
    "KeyReq",
    "KeyRsp",
    "MsgType",
    "ReportReq",
    "ReportRsp",
    "RootKey",
    "open_guest_message",
    "seal_guest_message",
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


# -- AEAD ------------------------------------------------------------------------------------------

VMPCK_SIZE = 32
_TAG = 16
MAX_SEQNO = (1 << 64) - 1  # MSG_SEQNO is a u64; the firmware refuses to wrap (AEAD_OFLOW)


def seal_guest_message(key: bytes, header: GuestMsgHeader, payload: bytes) -> bytes:
    """Encrypt ``payload`` under a VMPCK: AES-256-GCM, IV = MSG_SEQNO (96-bit LE), AAD = header[0x30:0x60].

    ``header.authtag`` and ``header.msg_size`` are ignored and filled in; returns header || ciphertext.
    """
    if len(key) != VMPCK_SIZE:
        raise MalformedStructure(f"a VMPCK is {VMPCK_SIZE} bytes")
    if len(payload) > MAX_PAYLOAD:
        raise MalformedStructure(f"guest message payload {len(payload):#x} exceeds {MAX_PAYLOAD:#x}")
    if not 1 <= header.msg_seqno <= MAX_SEQNO:
        raise MalformedStructure(f"MSG_SEQNO {header.msg_seqno} outside 1..2^64-1")
    head = dataclasses.replace(header, authtag=bytes(32), msg_size=len(payload))
    sealed = AESGCM(key).encrypt(head.iv(), payload, head.aad())
    head = dataclasses.replace(head, authtag=sealed[-_TAG:] + bytes(32 - _TAG))
    return head.to_bytes() + sealed[:-_TAG]


def open_guest_message(key: bytes, msg: bytes | bytearray | memoryview) -> tuple[GuestMsgHeader, bytes]:
    """Authenticate and decrypt a guest message. Any failure (framing, header, tag) is one opaque
    ``IntegrityError``: the relaying host learns nothing about which check failed.
    """
    msg = bytes(msg)
    try:
        header = GuestMsgHeader.from_bytes(msg[:HEADER_SIZE])
        body = msg[HEADER_SIZE:]
        if len(body) != header.msg_size or any(header.authtag[_TAG:]) or len(key) != VMPCK_SIZE:
            raise IntegrityError
        plain = AESGCM(key).decrypt(header.iv(), body + header.authtag[:_TAG], msg[AAD_SLICE])
    except (AbiError, InvalidTag, IntegrityError):
        raise IntegrityError from None
    return header, plain


class GuestChannel:
    """The guest side of one VMPCK: builds requests, opens the matching responses.

    MSG_SEQNO rules (SNP ABI, "Guest Message Header"): a request uses the last sequence number + 1, its
    response + 2. After any failure the channel disables itself, as Linux's sev-guest driver disables the
    VMPCK: the guest cannot tell whether the SP consumed the sequence number, and sending new plaintext
    under a possibly used IV would break AES-GCM.
    """

    def __init__(self, vmpck: bytes, *, vmpck_id: int = 0, last_seqno: int = 0) -> None:
        if len(vmpck) != VMPCK_SIZE or not 0 <= vmpck_id <= 3:
            raise MalformedStructure("GuestChannel needs a 32-byte VMPCK and an id 0..3")
        self._key = vmpck
        self._vmpck_id = vmpck_id
        self._seqno = last_seqno
        self._pending: tuple[MsgType, int] | None = None
        self._disabled = False

    @property
    def disabled(self) -> bool:
        return self._disabled

    @property
    def last_seqno(self) -> int:
        return self._seqno

    def request(self, msg_type: MsgType, payload: bytes, *, msg_version: int = 1) -> bytes:
        """Seal one request; the channel then waits for its response (one outstanding request)."""
        if self._disabled:
            raise IntegrityError
        if self._pending is not None:
            raise MalformedStructure("a guest request is already outstanding on this VMPCK")
        if msg_type is MsgType.INVALID or msg_type % 2 == 0:
            raise MalformedStructure(f"{MsgType(msg_type).name} is not a request message type")
        seqno = self._seqno + 1
        header = GuestMsgHeader(
            authtag=bytes(32), msg_seqno=seqno, msg_type=msg_type, msg_size=0, msg_vmpck=self._vmpck_id,
            msg_version=msg_version,
        )  # fmt: skip
        msg = seal_guest_message(self._key, header, payload)
        self._pending = (MsgType(msg_type + 1), seqno + 1)
        return msg

    def report_request(self, report_data: bytes, *, vmpl: int = 0, key_sel: int = 0) -> bytes:
        return self.request(MsgType.REPORT_REQ, ReportReq(report_data, vmpl, key_sel).to_bytes())

    def key_request(self, req: KeyReq) -> bytes:
        return self.request(MsgType.KEY_REQ, req.to_bytes())

    def open_response(self, msg: bytes) -> bytes:
        """Open the response to the outstanding request; returns its payload. Fails closed for good."""
        if self._disabled or self._pending is None:
            raise IntegrityError
        expected_type, expected_seqno = self._pending
        try:
            header, payload = open_guest_message(self._key, msg)
            if header.msg_type is not expected_type or header.msg_seqno != expected_seqno:
                raise IntegrityError
            if header.msg_vmpck != self._vmpck_id:
                raise IntegrityError
        except IntegrityError:
            self._disabled = True
            raise
        self._seqno = expected_seqno
        self._pending = None
        return payload
