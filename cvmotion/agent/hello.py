"""agent layer: HELLO — the one clear-text message each MA sends — and protocol version negotiation.

HELLO body (inside a HELLO frame, see ``cvmotion.agent.wire``)::

    offset size  field
    0x00   16    SESSION_ID     chosen by the source; the destination echoes it
    0x10   1     ROLE           1 source, 2 destination
    0x11   1     reserved       zero
    0x12   2     VERSION_MIN    protocol versions this MA speaks, inclusive (big-endian)
    0x14   2     VERSION_MAX
    0x16   2     reserved       zero
    0x18   4     CERT_LENGTH    then the RA-TLS certificate, DER (at most 32 KiB)

Negotiation (DESIGN section 6): ``chosen = min(max_src, max_dst)`` when the ranges overlap, else abort.  The
relay can rewrite a HELLO, so neither side trusts the negotiation until the first message inside TLS echoes
SHA-384 of both HELLOs as each side saw them and the version each side chose (``wire.Transcript``): a
rewritten range (downgrade) or a HELLO from another session (splice) aborts there.

This build implements protocol version 1.  Version 2 is accepted in a configured range as a *test alias* of
version 1 (same messages), so that negotiation and downgrade detection can be exercised while only one
version exists; a future version 2 replaces the alias.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cvmotion.agent._codec import Reader, Writer
from cvmotion.errors import ProtocolError, UsageError

__all__ = [
    "IMPLEMENTED_VERSIONS",
    "MAX_CERTIFICATE",
    "MAX_CONFIGURABLE_VERSION",
    "Hello",
    "Role",
    "VersionRange",
    "negotiate",
]

MAX_CERTIFICATE = 32 * 1024
MAX_CONFIGURABLE_VERSION = 2  # 2 is the test alias of 1 (module docstring)
SESSION_ID_SIZE = 16


class Role(enum.IntEnum):
    SOURCE = 1
    DESTINATION = 2

    @property
    def peer(self) -> Role:
        return Role.DESTINATION if self is Role.SOURCE else Role.SOURCE


@dataclass(frozen=True, slots=True)
class VersionRange:
    """An inclusive range of protocol versions, ``minimum <= maximum``, both in 1..0xFFFF on the wire."""

    minimum: int
    maximum: int

    def __post_init__(self) -> None:
        if not 1 <= self.minimum <= self.maximum <= 0xFFFF:
            raise ProtocolError(f"version range {self.minimum}..{self.maximum} is not 1 <= min <= max <= 65535")

    def check_configurable(self) -> VersionRange:
        """This range, if this build can speak every version in it (else ``UsageError``)."""
        if self.maximum > MAX_CONFIGURABLE_VERSION:
            raise UsageError(
                f"protocol versions {self.minimum}..{self.maximum}: this build speaks 1..{MAX_CONFIGURABLE_VERSION}"
            )
        return self

    def describe(self) -> str:
        return f"{self.minimum}..{self.maximum}"


IMPLEMENTED_VERSIONS = VersionRange(1, 1)


def negotiate(source: VersionRange, destination: VersionRange) -> int:
    """``min(max_src, max_dst)`` if the ranges overlap; otherwise ``ProtocolError`` naming both ranges."""
    low, high = max(source.minimum, destination.minimum), min(source.maximum, destination.maximum)
    if low > high:
        raise ProtocolError(
            f"no common protocol version: source speaks {source.describe()}, destination {destination.describe()}"
        )
    return high


@dataclass(frozen=True, slots=True)
class Hello:
    session_id: bytes
    role: Role
    versions: VersionRange
    certificate: bytes

    def to_bytes(self) -> bytes:
        w = Writer().fixed(self.session_id, SESSION_ID_SIZE, "HELLO.session_id").u8(self.role).zero(1)
        w.u16(self.versions.minimum).u16(self.versions.maximum).zero(2)
        return w.var(self.certificate, "HELLO.certificate", MAX_CERTIFICATE).to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> Hello:
        r = Reader(data, "HELLO")
        session_id = r.fixed(SESSION_ID_SIZE, "SESSION_ID")
        raw_role = r.u8("ROLE")
        r.zero(1, "reserved@0x11")
        low, high = r.u16("VERSION_MIN"), r.u16("VERSION_MAX")
        r.zero(2, "reserved@0x16")
        cert = r.var("CERT", MAX_CERTIFICATE, minimum=1)
        r.finish()
        try:
            role = Role(raw_role)
        except ValueError:
            raise ProtocolError(f"HELLO: ROLE {raw_role} at offset 0x10 is neither 1 (source) nor 2") from None
        if not 1 <= low <= high:
            raise ProtocolError(f"HELLO: version range {low}..{high} at offset 0x12 is empty or starts at 0")
        return cls(session_id, role, VersionRange(low, high), cert)
