"""abi layer: the kvstore guest's request and response format over cvm-io (guests/kvstore.c is the other side).

Pure encoding: the host daemon relays a client's kv operation to the guest with it, and the VMM-side client
(``vmm.workloads.KvClient``) uses the same functions.  Request: u8 op, u8 key length, u16 value length, key,
value.  Response: u8 status, u8 reserved, u16 value length, value.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from cvmotion.errors import DeviceError, UsageError

__all__ = ["KEY_MAX", "VALUE_MAX", "KvOp", "KvStats", "KvStatus", "decode_response", "encode_request"]


class KvOp(enum.IntEnum):
    GET = 1
    PUT = 2
    DELETE = 3
    STATS = 4
    BLOB = 5


class KvStatus(enum.IntEnum):
    OK = 0
    NOT_FOUND = 1
    FULL = 2
    BAD_REQUEST = 3
    NO_BLOB = 4
    TOO_BIG = 5


@dataclass(frozen=True, slots=True)
class KvStats:
    keys: int
    slots: int
    ops: int

    @classmethod
    def from_bytes(cls, value: bytes) -> KvStats:
        """The STATS response value: u32 keys, u32 slots, u64 ops (guests/kvstore.c)."""
        if len(value) != 16:
            raise DeviceError(f"kvstore: STATS value of {len(value)} bytes, expected 16")
        return cls(*struct.unpack("<IIQ", value))


KEY_MAX = 64
VALUE_MAX = 1024


def encode_request(op: KvOp, key: bytes = b"", value: bytes = b"") -> bytes:
    if len(key) > KEY_MAX or len(value) > VALUE_MAX:
        raise UsageError(f"kvstore: key ≤ {KEY_MAX} bytes and value ≤ {VALUE_MAX} bytes ({len(key)}, {len(value)})")
    return struct.pack("<BBH", op, len(key), len(value)) + key + value


def decode_response(data: bytes) -> tuple[KvStatus, bytes]:
    if len(data) < 4:
        raise DeviceError(f"kvstore: response of {len(data)} bytes is shorter than its 4-byte header")
    status, _, length = struct.unpack_from("<BBH", data)
    if len(data) != 4 + length:
        raise DeviceError(f"kvstore: response says {length} value bytes but carries {len(data) - 4}")
    try:
        return KvStatus(status), data[4:]
    except ValueError as exc:
        raise DeviceError(f"kvstore: unknown status {status}") from exc
