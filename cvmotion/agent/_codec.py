"""agent layer: strict big-endian reader/writer for the migration agent's wire messages.

Every variable-length field carries its length and a per-field bound, and ``Reader.finish`` refuses trailing
bytes, so a message decodes in exactly one way and an oversized field is refused before it is copied.
Errors name the message, the field and the offset in hex.
"""

from __future__ import annotations

import struct

from cvmotion.errors import ProtocolError

__all__ = ["Reader", "Writer"]

_U8, _U16, _U32, _U64 = struct.Struct(">B"), struct.Struct(">H"), struct.Struct(">I"), struct.Struct(">Q")


class Reader:
    """Reads fields from one message; every failure is a ``ProtocolError`` naming field and offset."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._off = 0
        self._what = what

    def _take(self, n: int, field: str) -> bytes:
        if self._off + n > len(self._data):
            raise ProtocolError(
                f"{self._what}: truncated at {field} (offset {self._off:#x}, needs {n:#x} bytes, "
                f"{len(self._data) - self._off:#x} left)"
            )
        out = self._data[self._off : self._off + n]
        self._off += n
        return out

    def u8(self, field: str) -> int:
        return int(_U8.unpack(self._take(1, field))[0])

    def u16(self, field: str) -> int:
        return int(_U16.unpack(self._take(2, field))[0])

    def u32(self, field: str) -> int:
        return int(_U32.unpack(self._take(4, field))[0])

    def u64(self, field: str) -> int:
        return int(_U64.unpack(self._take(8, field))[0])

    def fixed(self, n: int, field: str) -> bytes:
        return self._take(n, field)

    def zero(self, n: int, field: str) -> None:
        offset = self._off
        if any(self._take(n, field)):
            raise ProtocolError(f"{self._what}: reserved field {field} at offset {offset:#x} must be zero")

    def var(self, field: str, limit: int, *, minimum: int = 0) -> bytes:
        """A u32 length then that many bytes; the length must lie in [minimum, limit]."""
        offset = self._off
        n = self.u32(field)
        if not minimum <= n <= limit:
            raise ProtocolError(
                f"{self._what}: {field} length {n:#x} at offset {offset:#x} is outside {minimum:#x}..{limit:#x}"
            )
        return self._take(n, field)

    def finish(self) -> None:
        if self._off != len(self._data):
            raise ProtocolError(
                f"{self._what}: {len(self._data) - self._off:#x} unexpected trailing bytes at offset {self._off:#x}"
            )


class Writer:
    """Builds one message; the bounds are checked on the way out too, so we never emit what we would refuse."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u8(self, value: int) -> Writer:
        self._parts.append(_U8.pack(value))
        return self

    def u16(self, value: int) -> Writer:
        self._parts.append(_U16.pack(value))
        return self

    def u32(self, value: int) -> Writer:
        self._parts.append(_U32.pack(value))
        return self

    def u64(self, value: int) -> Writer:
        self._parts.append(_U64.pack(value))
        return self

    def fixed(self, data: bytes, n: int, field: str) -> Writer:
        if len(data) != n:
            raise ProtocolError(f"{field} must be {n:#x} bytes, not {len(data):#x}")
        self._parts.append(bytes(data))
        return self

    def zero(self, n: int) -> Writer:
        self._parts.append(bytes(n))
        return self

    def var(self, data: bytes, field: str, limit: int) -> Writer:
        if len(data) > limit:
            raise ProtocolError(f"{field} is {len(data):#x} bytes, above the limit {limit:#x}")
        self._parts.append(_U32.pack(len(data)))
        self._parts.append(bytes(data))
        return self

    def to_bytes(self) -> bytes:
        return b"".join(self._parts)
