"""firmware layer: key derivation inside the emulated AMD-SP (VCEK, VLEK, guest-requested keys, seeded RNG).

Real parts derive the VCEK from a fused chip-unique secret through the TCB components (so a firmware
update yields a new VCEK and AMD's KDS can compute the same public key from its manufacturing
database).  We model that with HKDF-SHA384 (RFC 5869) over the chip secret with the product and the
TCB_VERSION in ``info``, reduced to a P-384 scalar with 16 extra bytes (FIPS 186-5 A.2.1, "extra random
bits") so the scalar is unbiased.  The exact real derivation is AMD-secret; what matters and what the
tests check is the contract: deterministic per (chip, TCB), different across chips and across TCBs.

Keys for MSG_KEY_REQ (SNP ABI, "MSG_KEY_REQ") are HKDF-SHA384 outputs of 32 bytes whose ``info`` is a
fixed-layout encoding of every selected guest field, so two requests get the same key exactly when
they select the same fields with the same values from the same root.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cvmotion.abi.snp import Product, TcbVersion

__all__ = [
    "P384_ORDER",
    "RandomSource",
    "SeededRandom",
    "derive_p384_key",
    "derive_vcek",
    "hkdf_sha384",
    "system_random",
    "tcb_bytes",
    "vcek_root_secret",
]

# Order n of the NIST P-384 group (FIPS 186-5 / SP 800-186, curve P-384).
P384_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973

RandomSource = Callable[[int], bytes]
"""Where the firmware gets fresh secrets (VMPCKs, VMRK, report ids): ``os.urandom`` or a seeded source."""

_SALT = b"cvmotion emulated AMD-SP v1"


def system_random(n: int) -> bytes:
    return os.urandom(n)


class SeededRandom:
    """A deterministic byte source for tests and ``--seed``: SHA-384 in counter mode over the seed.

    Never used for real deployments (the CLI only uses it when the user asks for a seed, and says so).
    """

    def __init__(self, seed: int | bytes, label: str = "") -> None:
        raw = seed if isinstance(seed, bytes) else str(seed).encode()
        self._key = hashlib.sha384(b"cvmotion seeded random\0" + label.encode() + b"\0" + raw).digest()
        self._counter = 0

    def __call__(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            out += hashlib.sha384(self._key + self._counter.to_bytes(8, "little")).digest()
            self._counter += 1
        return bytes(out[:n])


def hkdf_sha384(ikm: bytes, info: bytes, length: int = 32, salt: bytes = _SALT) -> bytes:
    return HKDF(algorithm=hashes.SHA384(), length=length, salt=salt, info=info).derive(ikm)


def derive_p384_key(ikm: bytes, info: bytes) -> ec.EllipticCurvePrivateKey:
    """A P-384 private key whose scalar is HKDF(ikm, info) reduced into [1, n-1] without bias."""
    material = hkdf_sha384(ikm, info, length=48 + 16)
    scalar = int.from_bytes(material, "big") % (P384_ORDER - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP384R1())


def tcb_bytes(tcb: TcbVersion, product: Product) -> bytes:
    """The TCB_VERSION as the firmware holds it: a little-endian u64 in the product's layout."""
    return struct.pack("<Q", tcb.to_u64(product.tcb_layout))


def derive_vcek(chip_secret: bytes, product: Product, tcb: TcbVersion) -> ec.EllipticCurvePrivateKey:
    """The VCEK of one chip at one reported TCB (the KDS computes the same key from the fuse database)."""
    return derive_p384_key(chip_secret, b"VCEK\0" + product.value.encode() + b"\0" + tcb_bytes(tcb, product))


def vcek_root_secret(vcek: ec.EllipticCurvePrivateKey) -> bytes:
    """The VCEK's private scalar as bytes: the root of VCEK-rooted MSG_KEY_REQ keys (never leaves the SP)."""
    return vcek.private_numbers().private_value.to_bytes(48, "big")
