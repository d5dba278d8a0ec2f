"""agent layer: the migration agents' wire format — outer frames (relayed in the clear) and inner messages (in TLS).

Everything the untrusted hosts relay between two migration agents (MAs) is a **frame**; a frame is one unit
for the relay (the platform process length-prefixes it on its TCP connection).  Its 12-byte header is
independent of the negotiated protocol version, because HELLO is where the version is negotiated::

    offset size field
    0x00   4    MAGIC        "CVMA"
    0x04   1    FORMAT       1 (frame format, not the protocol version)
    0x05   1    TYPE         FrameType: HELLO 1, TLS 2, ERROR 3
    0x06   2    reserved     zero
    0x08   4    LENGTH       body length; must equal the bytes that follow exactly (big-endian, like TLS)

A TLS frame carries whole TLS records only, an ERROR frame ``ErrorMessage``.  Inside the TLS connection the
MAs exchange **inner messages** with an 8-byte header ``{type u16, reserved u16, length u32}``
(``MessageType``); a TLS frame always carries whole inner messages, so a frame that leaves a partial one
behind was truncated.  Every field has a bound, unknown types and non-zero reserved bytes are refused, and
nothing decodes with trailing bytes.  Key-bearing messages hide their key from ``repr``.  Inner bodies
(big-endian; ``var`` = u32 length then bytes)::

    transcript           SESSION_ID[16] VERSION u16 reserved u16 SHA-384 x4: HELLO frame of the source, of the
                         destination (as sent/received), RA-TLS certificate DER of the source, of the destination
    CONFIRM_DESTINATION  transcript, POLICY_SVN u32, pool credential var (DER, <= 8 KiB)
    CONFIRM_SOURCE       transcript, POLICY_SVN u32, pool credential var, guest POLICY u64, guest MEASUREMENT[48],
                         guest HOST_DATA[32], migration policy document var (<= 16 KiB)
    ACCEPT, DONE         SESSION_ID[16]
    FORWARD_KEY          SESSION_ID[16] K_f[32]            BACKWARD_KEY  SESSION_ID[16] K_b[32]
    ERROR (also the body of an ERROR frame)                CODE u16 reserved u16 reason var (UTF-8, <= 1 KiB)
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from cvmotion.abi.snp import GuestPolicy
from cvmotion.agent._codec import Reader, Writer
from cvmotion.agent.policy import GuestFacts
from cvmotion.errors import AbiError, ProtocolError

__all__ = [
    "FRAME_HEADER_SIZE",
    "KEY_SIZE",
    "MAX_FRAME_BODY",
    "MAX_POLICY_DOC",
    "MAX_POOL_CREDENTIAL",
    "MAX_REASON",
    "SESSION_ID_SIZE",
    "ConfirmDestination",
    "ConfirmSource",
    "ErrorCode",
    "ErrorMessage",
    "Frame",
    "FrameType",
    "InnerMessage",
    "KeyMessage",
    "Marker",
    "MessageType",
    "Transcript",
    "decode_frame",
    "decode_inner",
    "encode_frame",
    "encode_inner",
    "split_inner",
]

MAGIC = b"CVMA"
FRAME_FORMAT = 1
_FRAME = struct.Struct(">4sBBHI")
FRAME_HEADER_SIZE = _FRAME.size
MAX_FRAME_BODY = 64 * 1024  # a TLS flight with the RA-TLS certificate is ~10 KiB; HELLO ~9 KiB
MAX_REASON = 1024
MAX_POLICY_DOC = 16 * 1024
MAX_POOL_CREDENTIAL = 8 * 1024
SESSION_ID_SIZE = 16
KEY_SIZE = 32
DIGEST_SIZE = 48  # SHA-384
_INNER = struct.Struct(">HHI")
MAX_INNER_BODY = 32 * 1024


class FrameType(enum.IntEnum):
    INVALID = 0
    HELLO = 1
    TLS = 2
    ERROR = 3


class MessageType(enum.IntEnum):
    """Inner messages, in protocol order (see ``cvmotion.agent.session``)."""

    INVALID = 0
    CONFIRM_DESTINATION = 1
    CONFIRM_SOURCE = 2
    ACCEPT = 3
    FORWARD_KEY = 4
    BACKWARD_KEY = 5
    DONE = 6
    ERROR = 7


class ErrorCode(enum.IntEnum):
    """Why an MA aborted (ERROR frame or inner ERROR); the reason text is informational only."""

    PROTOCOL = 1
    VERSION = 2
    VERIFICATION = 3
    POLICY = 4
    FIRMWARE = 5
    INTERNAL = 6


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    body: bytes


def encode_frame(kind: FrameType, body: bytes) -> bytes:
    if len(body) > MAX_FRAME_BODY:
        raise ProtocolError(f"{kind.name} frame body of {len(body):#x} bytes exceeds {MAX_FRAME_BODY:#x}")
    return _FRAME.pack(MAGIC, FRAME_FORMAT, kind, 0, len(body)) + body


def decode_frame(data: bytes | bytearray | memoryview) -> Frame:
    """Parse one relayed frame strictly (magic, format, type, reserved, exact length, size bound)."""
    raw = bytes(data)
    if len(raw) > FRAME_HEADER_SIZE + MAX_FRAME_BODY:
        raise ProtocolError(f"frame of {len(raw):#x} bytes exceeds the limit {FRAME_HEADER_SIZE + MAX_FRAME_BODY:#x}")
    if len(raw) < FRAME_HEADER_SIZE:
        raise ProtocolError(f"frame of {len(raw):#x} bytes is shorter than its {FRAME_HEADER_SIZE:#x}-byte header")
    magic, fmt, kind, reserved, length = _FRAME.unpack_from(raw)
    if magic != MAGIC:
        raise ProtocolError(f"frame MAGIC {magic.hex()} at offset 0x0 is not {MAGIC.hex()} ('CVMA')")
    if fmt != FRAME_FORMAT:
        raise ProtocolError(f"frame FORMAT {fmt} at offset 0x4 is not {FRAME_FORMAT}")
    if kind not in (FrameType.HELLO, FrameType.TLS, FrameType.ERROR):
        raise ProtocolError(f"frame TYPE {kind} at offset 0x5 is unknown")
    if reserved:
        raise ProtocolError("frame reserved field at offset 0x6 must be zero")
    if length != len(raw) - FRAME_HEADER_SIZE:
        raise ProtocolError(
            f"frame LENGTH {length:#x} at offset 0x8 but {len(raw) - FRAME_HEADER_SIZE:#x} body bytes (truncated?)"
        )
    return Frame(FrameType(kind), raw[FRAME_HEADER_SIZE:])


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    code: ErrorCode
    reason: str

    def to_bytes(self) -> bytes:
        reason = self.reason.encode("utf-8", "replace")[:MAX_REASON]
        return Writer().u16(self.code).zero(2).var(reason, "ERROR.reason", MAX_REASON).to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> ErrorMessage:
        r = Reader(data, "ERROR")
        code = r.u16("code")
        r.zero(2, "reserved")
        raw = r.var("reason", MAX_REASON)
        r.finish()
        try:
            kind = ErrorCode(code)
        except ValueError:
            raise ProtocolError(f"ERROR: unknown code {code}") from None
        # Printable text only: a peer's reason ends up in logs and on a terminal.
        text = "".join(c if c.isprintable() else "?" for c in raw.decode("utf-8", "replace"))
        return cls(kind, text)


@dataclass(frozen=True, slots=True)
class Transcript:
    """What the first message each way echoes: the session, the version and SHA-384 of both HELLOs and certs."""

    session_id: bytes
    version: int
    hello_source: bytes
    hello_destination: bytes
    cert_source: bytes
    cert_destination: bytes

    def write(self, w: Writer) -> None:
        w.fixed(self.session_id, SESSION_ID_SIZE, "session_id").u16(self.version).zero(2)
        for name in ("hello_source", "hello_destination", "cert_source", "cert_destination"):
            w.fixed(getattr(self, name), DIGEST_SIZE, name)

    @classmethod
    def read(cls, r: Reader) -> Transcript:
        session_id = r.fixed(SESSION_ID_SIZE, "session_id")
        version = r.u16("version")
        r.zero(2, "reserved")
        names = ("hello_source", "hello_destination", "cert_source", "cert_destination")
        digests = [r.fixed(DIGEST_SIZE, n) for n in names]
        return cls(session_id, version, *digests)

    def mismatches(self, other: Transcript) -> list[str]:
        """Names of the fields in which ``other`` (what the peer echoed) differs from this (what we saw)."""
        names = ("session_id", "version", "hello_source", "hello_destination", "cert_source", "cert_destination")
        return [n for n in names if getattr(self, n) != getattr(other, n)]


@dataclass(frozen=True, slots=True)
class ConfirmSource:
    """Source -> destination, its first message in TLS (after the forward policy passed): transcript, its pool
    credential and policy SVN, the VM's facts and migration policy document."""

    transcript: Transcript
    policy_svn: int
    pool_credential: bytes
    guest: GuestFacts
    policy_doc: bytes

    def to_bytes(self) -> bytes:
        w = Writer()
        self.transcript.write(w)
        w.u32(self.policy_svn).var(self.pool_credential, "pool_credential", MAX_POOL_CREDENTIAL)
        w.u64(self.guest.policy.to_u64()).fixed(self.guest.measurement, DIGEST_SIZE, "guest measurement")
        w.fixed(self.guest.host_data, 32, "guest host_data").var(self.policy_doc, "policy_doc", MAX_POLICY_DOC)
        return w.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> ConfirmSource:
        r = Reader(data, "CONFIRM_SOURCE")
        transcript = Transcript.read(r)
        svn = r.u32("policy_svn")
        cred = r.var("pool_credential", MAX_POOL_CREDENTIAL, minimum=1)
        raw_policy = r.u64("guest policy")
        try:
            policy = GuestPolicy.from_u64(raw_policy)
        except AbiError as exc:
            raise ProtocolError(f"CONFIRM_SOURCE: guest policy: {exc}") from None
        guest = GuestFacts(policy, r.fixed(DIGEST_SIZE, "guest measurement"), r.fixed(32, "guest host_data"))
        doc = r.var("policy_doc", MAX_POLICY_DOC, minimum=1)
        r.finish()
        return cls(transcript, svn, cred, guest, doc)


@dataclass(frozen=True, slots=True)
class ConfirmDestination:
    """Destination -> source, the first message in TLS (sent when the handshake completes)."""

    transcript: Transcript
    policy_svn: int
    pool_credential: bytes

    def to_bytes(self) -> bytes:
        w = Writer()
        self.transcript.write(w)
        w.u32(self.policy_svn).var(self.pool_credential, "pool_credential", MAX_POOL_CREDENTIAL)
        return w.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> ConfirmDestination:
        r = Reader(data, "CONFIRM_DESTINATION")
        transcript = Transcript.read(r)
        svn = r.u32("policy_svn")
        cred = r.var("pool_credential", MAX_POOL_CREDENTIAL, minimum=1)
        r.finish()
        return cls(transcript, svn, cred)


@dataclass(frozen=True, slots=True)
class KeyMessage:
    """FORWARD_KEY (K_f, source -> destination) or BACKWARD_KEY (K_b, destination -> source). Only inside TLS."""

    session_id: bytes
    key: bytes = field(repr=False)

    def to_bytes(self) -> bytes:
        w = Writer().fixed(self.session_id, SESSION_ID_SIZE, "session_id")
        return w.fixed(self.key, KEY_SIZE, "key").to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes, what: str) -> KeyMessage:
        r = Reader(data, what)
        session_id, key = r.fixed(SESSION_ID_SIZE, "session_id"), r.fixed(KEY_SIZE, "key")
        r.finish()
        return cls(session_id, key)


@dataclass(frozen=True, slots=True)
class Marker:
    """ACCEPT (destination: the backward policy passed) or DONE (source: K_b installed); just the session id."""

    session_id: bytes

    def to_bytes(self) -> bytes:
        return Writer().fixed(self.session_id, SESSION_ID_SIZE, "session_id").to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes, what: str) -> Marker:
        r = Reader(data, what)
        session_id = r.fixed(SESSION_ID_SIZE, "session_id")
        r.finish()
        return cls(session_id)


InnerMessage = ConfirmSource | ConfirmDestination | KeyMessage | Marker | ErrorMessage


def encode_inner(kind: MessageType, message: InnerMessage) -> bytes:
    body = message.to_bytes()
    if len(body) > MAX_INNER_BODY:
        raise ProtocolError(f"{kind.name} of {len(body):#x} bytes exceeds {MAX_INNER_BODY:#x}")
    return _INNER.pack(kind, 0, len(body)) + body


def split_inner(buffer: bytearray) -> list[tuple[MessageType, bytes]]:
    """Remove and return every complete inner message at the front of ``buffer`` (a partial one stays)."""
    out: list[tuple[MessageType, bytes]] = []
    while len(buffer) >= _INNER.size:
        raw_kind, reserved, length = _INNER.unpack_from(buffer)
        try:
            kind = MessageType(raw_kind)
        except ValueError:
            raise ProtocolError(f"inner message TYPE {raw_kind} is unknown") from None
        if kind is MessageType.INVALID:
            raise ProtocolError("inner message TYPE 0 (INVALID)")
        if reserved:
            raise ProtocolError(f"inner {kind.name}: reserved field at offset 0x2 must be zero")
        if length > MAX_INNER_BODY:
            raise ProtocolError(f"inner {kind.name} LENGTH {length:#x} exceeds {MAX_INNER_BODY:#x}")
        if len(buffer) < _INNER.size + length:
            break
        out.append((kind, bytes(buffer[_INNER.size : _INNER.size + length])))
        del buffer[: _INNER.size + length]
    return out


def decode_inner(kind: MessageType, body: bytes) -> InnerMessage:
    if kind is MessageType.CONFIRM_SOURCE:
        return ConfirmSource.from_bytes(body)
    if kind is MessageType.CONFIRM_DESTINATION:
        return ConfirmDestination.from_bytes(body)
    if kind in (MessageType.FORWARD_KEY, MessageType.BACKWARD_KEY):
        return KeyMessage.from_bytes(body, kind.name)
    if kind in (MessageType.ACCEPT, MessageType.DONE):
        return Marker.from_bytes(body, kind.name)
    if kind is MessageType.ERROR:
        return ErrorMessage.from_bytes(body)
    raise ProtocolError(f"inner message TYPE {kind} is unknown")
