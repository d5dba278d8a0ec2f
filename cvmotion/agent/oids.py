"""agent layer: the X.509 object identifiers of cvmotion's RA-TLS certificates and pool credentials.

All live under one UUID-derived arc (ITU-T X.667 / RFC 4122 section 4: ``2.25.<UUID as an integer>``), which
needs no registration and cannot collide with anyone else's.  The UUID is
``f9cf9664-023e-4e1f-a42b-9c0dafd81630`` (random, version 4), so the arc is
``2.25.332055626685111853197874369884463830576``::

    arc.1    RA-TLS: the SNP attestation report (0x4A0 bytes)             extension, non-critical, OCTET STRING
    arc.2    RA-TLS: its endorsements, PEM: VCEK (or VLEK), ASK, ARK      extension, non-critical, OCTET STRING
    arc.10   pool credential: the host's 64-byte CHIP_ID                   extension, non-critical, OCTET STRING
    arc.11   pool credential: the pool name (UTF-8)                         extension, non-critical, OCTET STRING
    arc.12   pool credential: extendedKeyUsage purpose "cvmotion host pool membership"

Extension values are DER ``OCTET STRING`` wrappers around the raw bytes (``encode_octets`` /
``decode_octets``), so generic X.509 tools can still parse the certificates.
"""

from __future__ import annotations

from cryptography import x509

__all__ = [
    "ARC",
    "OID_POOL_CHIP_ID",
    "OID_POOL_MEMBERSHIP",
    "OID_POOL_NAME",
    "OID_RATLS_ENDORSEMENTS",
    "OID_RATLS_REPORT",
    "decode_octets",
    "encode_octets",
]

ARC = "2.25.332055626685111853197874369884463830576"  # UUID f9cf9664-023e-4e1f-a42b-9c0dafd81630
OID_RATLS_REPORT = x509.ObjectIdentifier(f"{ARC}.1")
OID_RATLS_ENDORSEMENTS = x509.ObjectIdentifier(f"{ARC}.2")
OID_POOL_CHIP_ID = x509.ObjectIdentifier(f"{ARC}.10")
OID_POOL_NAME = x509.ObjectIdentifier(f"{ARC}.11")
OID_POOL_MEMBERSHIP = x509.ObjectIdentifier(f"{ARC}.12")

_OCTET_STRING = 0x04


def encode_octets(data: bytes) -> bytes:
    """DER OCTET STRING (definite length, minimal length octets)."""
    n = len(data)
    if n < 0x80:
        return bytes([_OCTET_STRING, n]) + data
    size = (n.bit_length() + 7) // 8
    return bytes([_OCTET_STRING, 0x80 | size]) + n.to_bytes(size, "big") + data


def decode_octets(value: bytes, what: str) -> bytes:
    """The content of a DER OCTET STRING that spans ``value`` exactly; ``ValueError`` naming ``what`` otherwise."""
    if len(value) < 2 or value[0] != _OCTET_STRING:
        raise ValueError(f"{what}: not a DER OCTET STRING")
    first = value[1]
    start = 2
    if first & 0x80:
        size = first & 0x7F
        if not 1 <= size <= 4 or len(value) < 2 + size or value[2] == 0:
            raise ValueError(f"{what}: bad DER length")
        length = int.from_bytes(value[2 : 2 + size], "big")
        if length < 0x80:
            raise ValueError(f"{what}: non-minimal DER length")
        start += size
    else:
        length = first
    if start + length != len(value):
        raise ValueError(f"{what}: DER length {length:#x} does not match the {len(value) - start:#x} bytes present")
    return value[start:]
