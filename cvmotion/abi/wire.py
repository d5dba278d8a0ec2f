"""abi layer: migration stream records (bundles), modelled on the TDX migration bundle metadata (MBMD).

Every bundle starts with its metadata block (MBMD)::

    offset size field
    0x00   2    size         bytes of the MBMD: header + type metadata + 16-byte MAC (payload excluded)
    0x02   2    version      migration protocol version (1)
    0x04   2    stream       logical stream index (multifd); 0xFFFF for the backward direction
    0x06   1    type         BundleType
    0x07   1    reserved     must be zero
    0x08   4    mb_counter   per-stream bundle counter, exact (0, 1, 2, ...)
    0x0C   4    epoch        pre-copy epoch; strictly increasing
    0x10   8    iv_counter   first AES-GCM IV counter this bundle uses
    0x18   ...  metadata     type-specific, below
    end-16 16   mac          AES-256-GCM tag over an empty plaintext, AAD = header || metadata

A bundle consumes ``1 + units`` IVs: the MAC uses ``iv_counter``, payload unit ``i`` uses ``iv_counter + 1 + i``.
The 96-bit IV is ``iv_counter (u64 LE) || stream (u16 LE) || 0x0000`` so no (key, IV) pair ever repeats
across streams.  Payload units follow the MBMD, each ``ciphertext || tag``:

- MEMORY: metadata = ``num_entries u16, reserved u16, reserved u32`` then ``num_entries`` u64 entries, each a
  page-aligned GPA with flags in bits 11:0 (bit 0 ZERO: the page is all zeroes and carries no data).  One
  4096-byte unit per non-zero entry, AAD = header || the entry (so a page cannot be moved to another GPA or
  another bundle).
- IMMUTABLE_STATE, VCPU_STATE, DEVICE_STATE, MUTABLE_STATE: metadata = ``payload_len u32, reserved u32``; one
  unit of ``payload_len`` bytes, AAD = header.
- EPOCH_TOKEN: metadata = ``total_mb u32, reserved u32``: bundles sent in the epoch being closed (all streams,
  the token excluded).  No payload.  Plaintext on purpose: the untrusted receiver reads ``total_mb`` to know how
  many bundles to hand to the firmware before the token.
- START_TOKEN: metadata = ``session_id[16], total_mb u32, reserved u32``.  No payload.
- ABORT_TOKEN (backward key): metadata = ``session_id[16], reason u32, reserved u32``.  No payload.
- COMMIT_RECEIPT (backward key): metadata = ``session_id[16], start_token_digest[32]`` (SHA-256 of the whole
  start token the destination verified).  No payload.  The destination's proof of commit: the source
  decommissions only on a receipt its firmware verifies, never on a plaintext verdict.

Both backward-key tokens travel on ``BACKWARD_STREAM`` with ``mb_counter`` 0 and epoch 0; the abort token uses
``iv_counter`` 0 and the receipt ``iv_counter`` 1, so the two never share a GCM nonce under K_b.

Everything here is layout only; sealing and opening happen in the firmware (``firmware.mig_stream``).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from cvmotion.abi._codec import require_zero
from cvmotion.errors import MalformedStructure, UnsupportedVersion

__all__ = [
    "BACKWARD_STREAM",
    "HEADER_SIZE",
    "MAC_SIZE",
    "MAX_PAGES_PER_BUNDLE",
    "PAGE_SIZE",
    "PROTOCOL_VERSION",
    "TAG_SIZE",
    "BundleHeader",
    "BundleType",
    "EntryFlag",
    "aad_for_page",
    "bundle_capacity",
    "gcm_iv",
    "pack_memory_metadata",
    "pack_payload_metadata",
    "pack_start_token_metadata",
    "pack_abort_token_metadata",
    "pack_commit_receipt_metadata",
    "pack_epoch_token_metadata",
    "parse_memory_metadata",
    "parse_payload_metadata",
    "parse_start_token_metadata",
    "parse_abort_token_metadata",
    "parse_commit_receipt_metadata",
    "parse_epoch_token_metadata",
]

PROTOCOL_VERSION = 1
HEADER_SIZE = 24
MAC_SIZE = 16
TAG_SIZE = 16
PAGE_SIZE = 4096
MAX_PAGES_PER_BUNDLE = 512  # 2 MiB of payload; keeps the MBMD (24 + 8 + 8*512 + 16) well under the u16 size
BACKWARD_STREAM = 0xFFFF
_ENTRY_FLAGS_MASK = PAGE_SIZE - 1
SESSION_ID_SIZE = 16
START_TOKEN_DIGEST_SIZE = 32


class BundleType(enum.IntEnum):
    """MBMD type field (DESIGN section 6)."""

    INVALID = 0
    IMMUTABLE_STATE = 1
    MEMORY = 2
    VCPU_STATE = 3
    DEVICE_STATE = 4
    MUTABLE_STATE = 5
    EPOCH_TOKEN = 6
    START_TOKEN = 7
    ABORT_TOKEN = 8
    COMMIT_RECEIPT = 9


class EntryFlag(enum.IntFlag):
    """Flags in the low 12 bits of a MEMORY entry."""

    ZERO = 1 << 0


_HEADER = struct.Struct("<HHHBBIIQ")
assert _HEADER.size == HEADER_SIZE  # module invariant


@dataclass(frozen=True, slots=True)
class BundleHeader:
    """The 24-byte MBMD header."""

    size: int
    stream: int
    type: BundleType
    mb_counter: int
    epoch: int
    iv_counter: int
    version: int = PROTOCOL_VERSION

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> BundleHeader:
        data = bytes(data[:HEADER_SIZE])
        if len(data) != HEADER_SIZE:
            raise MalformedStructure(f"bundle header: expected {HEADER_SIZE:#x} bytes, got {len(data):#x}")
        require_zero("bundle header", data, 0x07, 0x08)
        size, version, stream, kind, _rsvd, mb_counter, epoch, iv_counter = _HEADER.unpack(data)
        if version != PROTOCOL_VERSION:
            raise UnsupportedVersion(f"bundle header: protocol version {version} (this side speaks 1)")
        try:
            bundle_type = BundleType(kind)
        except ValueError:
            raise MalformedStructure(f"bundle header: unknown type {kind}") from None
        if bundle_type is BundleType.INVALID:
            raise MalformedStructure("bundle header: type 0 is invalid")
        if size < HEADER_SIZE + MAC_SIZE:
            raise MalformedStructure(f"bundle header: size {size:#x} is smaller than header + MAC")
        return cls(
            size=size,
            stream=stream,
            type=bundle_type,
            mb_counter=mb_counter,
            epoch=epoch,
            iv_counter=iv_counter,
            version=version,
        )

    def to_bytes(self) -> bytes:
        try:
            return _HEADER.pack(
                self.size,
                self.version,
                self.stream,
                int(self.type),
                0,
                self.mb_counter,
                self.epoch,
                self.iv_counter,
            )
        except struct.error as exc:
            raise MalformedStructure(f"bundle header field out of range: {exc}") from exc


def gcm_iv(iv_counter: int, stream: int) -> bytes:
    """The 96-bit IV: iv_counter (u64 LE) || stream (u16 LE) || two zero bytes."""
    return iv_counter.to_bytes(8, "little") + stream.to_bytes(2, "little") + b"\x00\x00"


def aad_for_page(header: bytes, entry: int) -> bytes:
    """AAD of one memory page: the bundle header and the page's GPA entry."""
    return header + entry.to_bytes(8, "little")


_MEM_HEAD = struct.Struct("<HHI")


def pack_memory_metadata(entries: list[int] | tuple[int, ...]) -> bytes:
    """Metadata of a MEMORY bundle: count then u64 GPA|flags entries."""
    if not 0 < len(entries) <= MAX_PAGES_PER_BUNDLE:
        raise MalformedStructure(f"memory bundle holds 1..{MAX_PAGES_PER_BUNDLE} pages, not {len(entries)}")
    return _MEM_HEAD.pack(len(entries), 0, 0) + struct.pack(f"<{len(entries)}Q", *entries)


def parse_memory_metadata(metadata: bytes) -> tuple[int, ...]:
    """Entries of a MEMORY bundle; checks the count, reserved fields, alignment flags and duplicates."""
    if len(metadata) < _MEM_HEAD.size:
        raise MalformedStructure("memory bundle: metadata too short")
    count, rsvd0, rsvd1 = _MEM_HEAD.unpack_from(metadata)
    if rsvd0 or rsvd1:
        raise MalformedStructure("memory bundle: reserved metadata fields must be zero")
    if not 0 < count <= MAX_PAGES_PER_BUNDLE or len(metadata) != _MEM_HEAD.size + 8 * count:
        raise MalformedStructure(f"memory bundle: {count} entries do not match {len(metadata)} metadata bytes")
    entries = struct.unpack_from(f"<{count}Q", metadata, _MEM_HEAD.size)
    for entry in entries:
        if entry & _ENTRY_FLAGS_MASK & ~int(EntryFlag.ZERO):
            raise MalformedStructure(f"memory bundle: entry {entry:#x} has reserved flag bits set")
    return entries


_PAYLOAD = struct.Struct("<II")


def pack_payload_metadata(payload_len: int) -> bytes:
    return _PAYLOAD.pack(payload_len, 0)


def parse_payload_metadata(metadata: bytes) -> int:
    if len(metadata) != _PAYLOAD.size:
        raise MalformedStructure("state bundle: metadata must be 8 bytes")
    payload_len, rsvd = _PAYLOAD.unpack(metadata)
    if rsvd:
        raise MalformedStructure("state bundle: reserved metadata field must be zero")
    return int(payload_len)


def pack_epoch_token_metadata(total_mb: int) -> bytes:
    return _PAYLOAD.pack(total_mb, 0)


def parse_epoch_token_metadata(metadata: bytes) -> int:
    if len(metadata) != _PAYLOAD.size:
        raise MalformedStructure("epoch token: metadata must be 8 bytes")
    total_mb, rsvd = _PAYLOAD.unpack(metadata)
    if rsvd:
        raise MalformedStructure("epoch token: reserved field must be zero")
    return int(total_mb)


_TOKEN = struct.Struct("<16sII")


def pack_start_token_metadata(session_id: bytes, total_mb: int) -> bytes:
    if len(session_id) != SESSION_ID_SIZE:
        raise MalformedStructure("start token: session id must be 16 bytes")
    return _TOKEN.pack(session_id, total_mb, 0)


def parse_start_token_metadata(metadata: bytes) -> tuple[bytes, int]:
    if len(metadata) != _TOKEN.size:
        raise MalformedStructure("start token: metadata must be 24 bytes")
    session_id, total_mb, rsvd = _TOKEN.unpack(metadata)
    if rsvd:
        raise MalformedStructure("start token: reserved field must be zero")
    return session_id, int(total_mb)


def pack_abort_token_metadata(session_id: bytes, reason: int) -> bytes:
    if len(session_id) != SESSION_ID_SIZE:
        raise MalformedStructure("abort token: session id must be 16 bytes")
    return _TOKEN.pack(session_id, reason, 0)


def parse_abort_token_metadata(metadata: bytes) -> tuple[bytes, int]:
    if len(metadata) != _TOKEN.size:
        raise MalformedStructure("abort token: metadata must be 24 bytes")
    session_id, reason, rsvd = _TOKEN.unpack(metadata)
    if rsvd:
        raise MalformedStructure("abort token: reserved field must be zero")
    return session_id, int(reason)


_RECEIPT = struct.Struct("<16s32s")


def pack_commit_receipt_metadata(session_id: bytes, start_token_digest: bytes) -> bytes:
    if len(session_id) != SESSION_ID_SIZE or len(start_token_digest) != START_TOKEN_DIGEST_SIZE:
        raise MalformedStructure("commit receipt: session id is 16 bytes, the start token digest 32")
    return _RECEIPT.pack(session_id, start_token_digest)


def parse_commit_receipt_metadata(metadata: bytes) -> tuple[bytes, bytes]:
    if len(metadata) != _RECEIPT.size:
        raise MalformedStructure(f"commit receipt: metadata must be {_RECEIPT.size} bytes")
    session_id, digest = _RECEIPT.unpack(metadata)
    return bytes(session_id), bytes(digest)


def bundle_capacity(pages: int) -> int:
    """Bytes a memory bundle of ``pages`` pages needs at most (all pages non-zero): header, metadata, one GPA
    entry and one sealed page (ciphertext and tag) per page, the MAC."""
    return HEADER_SIZE + 8 + 8 * pages + MAC_SIZE + pages * (PAGE_SIZE + TAG_SIZE)
