"""firmware layer: the VLEK "hashstick": a VLEK private key wrapped by the vendor for one chip.

AMD issues a Versioned Loaded Endorsement Key to a cloud provider for a (product, TCB) and delivers it
wrapped so that only the target chip's firmware can unwrap it (SNP_VLEK_LOAD; the host handles only the
wrapped blob).  AMD's real wrapping format is not public; ours is documented here and versioned:

```
offset size  field
0x00   8     MAGIC "CVMVLEK\\0"
0x08   4     VERSION (u32 LE) = 1
0x0C   1     PRODUCT (0 Milan, 1 Genoa, 2 Turin)
0x0D   3     reserved, zero
0x10   8     TCB_VERSION (u64 LE, product layout) the VLEK is certified for
0x18   2     CSP_ID_LEN (u16 LE), 1..255
0x1A   6     reserved, zero
0x20   12    NONCE (AES-GCM IV)
0x2C   4     reserved, zero
0x30   n     CSP_ID (ASCII)
0x30+n 64    AES-256-GCM(wrap key, VLEK private scalar 48 bytes BE) || tag 16
```
The wrap key is HKDF-SHA384(chip secret, "VLEK wrap"); the AAD is every byte before the ciphertext, so
the host cannot retarget a hashstick to another TCB or CSP.  A chip that cannot unwrap answers
``FirmwareError(BAD_SIGNATURE)`` (opaque: no detail about why).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cvmotion.abi.snp import Product, TcbVersion
from cvmotion.errors import AbiError, FirmwareError, FirmwareStatus, UsageError
from cvmotion.firmware.keys import hkdf_sha384

__all__ = ["HASHSTICK_MAGIC", "UnwrappedVlek", "unwrap_vlek", "wrap_vlek"]

HASHSTICK_MAGIC = b"CVMVLEK\0"
_VERSION = 1
_HEAD = struct.Struct("<8sIB3sQH6s12s4s")
_PRODUCTS = (Product.MILAN, Product.GENOA, Product.TURIN)
_CT_LEN = 48 + 16


@dataclass(frozen=True, slots=True)
class UnwrappedVlek:
    """What the firmware learns from a hashstick. Lives only inside the SP."""

    product: Product
    tcb: TcbVersion
    csp_id: str
    key: ec.EllipticCurvePrivateKey = field(repr=False)


def _wrap_key(chip_secret: bytes) -> bytes:
    return hkdf_sha384(chip_secret, b"VLEK wrap")


def wrap_vlek(
    chip_secret: bytes,
    product: Product,
    tcb: TcbVersion,
    csp_id: str,
    key: ec.EllipticCurvePrivateKey,
    nonce: bytes,
) -> bytes:
    """Vendor side: wrap ``key`` for the chip whose secret is ``chip_secret``."""
    csp = csp_id.encode("ascii") if csp_id.isascii() else b""
    if not 1 <= len(csp) <= 255:
        raise UsageError(f"cspId {csp_id!r} must be 1..255 ASCII characters")
    head = _HEAD.pack(
        HASHSTICK_MAGIC,
        _VERSION,
        _PRODUCTS.index(product),
        b"",
        tcb.to_u64(product.tcb_layout),
        len(csp),
        b"",
        nonce,
        b"",
    )
    scalar = key.private_numbers().private_value.to_bytes(48, "big")
    aad = head + csp
    return aad + AESGCM(_wrap_key(chip_secret)).encrypt(nonce, scalar, aad)


def unwrap_vlek(chip_secret: bytes, blob: bytes) -> UnwrappedVlek:
    """Firmware side (SNP_VLEK_LOAD): unwrap; any problem is one opaque ``BAD_SIGNATURE``."""
    try:
        magic, version, prod, rsvd0, tcb_raw, csp_len, rsvd1, nonce, rsvd2 = _HEAD.unpack_from(blob)
        aad_len = _HEAD.size + csp_len
        if (
            magic != HASHSTICK_MAGIC
            or version != _VERSION
            or prod >= len(_PRODUCTS)
            or any(rsvd0 + rsvd1 + rsvd2)
            or len(blob) != aad_len + _CT_LEN
        ):
            raise ValueError("malformed")
        product = _PRODUCTS[prod]
        scalar = AESGCM(_wrap_key(chip_secret)).decrypt(nonce, blob[aad_len:], blob[:aad_len])
        key = ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP384R1())
        return UnwrappedVlek(
            product=product,
            tcb=TcbVersion.from_u64(tcb_raw, product.tcb_layout),
            csp_id=blob[_HEAD.size : aad_len].decode("ascii"),
            key=key,
        )
    except (struct.error, ValueError, InvalidTag, AbiError, ArithmeticError) as exc:
        raise FirmwareError(FirmwareStatus.BAD_SIGNATURE, "VLEK hashstick rejected") from exc
