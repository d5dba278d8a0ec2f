"""firmware layer: the ID block and ID authentication structure checked by SNP_LAUNCH_FINISH.

Layouts (SNP ABI, "ID_BLOCK" and "ID_AUTH_INFO" tables; ECDSA P-384 with SHA-384, integers little-endian
in 72-byte fields, the public key format of the "ECDSA Public Key" table):

```
ID_BLOCK (0x60)                          ID_AUTH_INFO (0x1000)
0x00 LD[48]       expected digest        0x000 ID_KEY_ALGO u32 (1)     0x004 AUTH_KEY_ALGO u32 (1)
0x30 FAMILY_ID[16]                       0x040 ID_BLOCK_SIG[0x200]     R[72] S[72] reserved
0x40 IMAGE_ID[16]                        0x240 ID_KEY[0x404]           CURVE u32 (2 = P-384) QX[72] QY[72]
0x50 VERSION u32 (1)                     0x680 ID_KEY_SIG[0x200]       ID_KEY signed by the author key
0x54 GUEST_SVN u32                       0x880 AUTHOR_KEY[0x404]
0x58 POLICY u64                          other bytes reserved
```
ID_KEY_DIGEST / AUTHOR_KEY_DIGEST in the report are SHA-384 of the 0x404-byte public key structures.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from cvmotion.errors import FirmwareError, FirmwareStatus

__all__ = [
    "ID_AUTH_SIZE",
    "ID_BLOCK_SIZE",
    "IdBlock",
    "LaunchIdentity",
    "marshal_public_key",
    "sign_id_block",
    "verify_id_block",
]

ID_BLOCK_SIZE = 0x60
ID_AUTH_SIZE = 0x1000
_ALGO_ECDSA_P384_SHA384 = 1
_CURVE_P384 = 2
_KEY_SIZE = 0x404
_SIG_SIZE = 0x200
_ID_BLOCK = struct.Struct("<48s16s16sIIQ")
_SIG_OFF, _ID_KEY_OFF, _ID_KEY_SIG_OFF, _AUTHOR_KEY_OFF = 0x040, 0x240, 0x680, 0x880


@dataclass(frozen=True, slots=True)
class IdBlock:
    ld: bytes
    family_id: bytes = bytes(16)
    image_id: bytes = bytes(16)
    guest_svn: int = 0
    policy: int = 0x30000
    version: int = 1

    @classmethod
    def from_bytes(cls, data: bytes) -> IdBlock:
        if len(data) != ID_BLOCK_SIZE:
            raise FirmwareError(FirmwareStatus.INVALID_LENGTH, f"ID_BLOCK is {ID_BLOCK_SIZE:#x} bytes")
        ld, family, image, version, svn, policy = _ID_BLOCK.unpack(data)
        return cls(ld=ld, family_id=family, image_id=image, guest_svn=svn, policy=policy, version=version)

    def to_bytes(self) -> bytes:
        return _ID_BLOCK.pack(self.ld, self.family_id, self.image_id, self.version, self.guest_svn, self.policy)


@dataclass(frozen=True, slots=True)
class LaunchIdentity:
    """What LAUNCH_FINISH records from a verified ID block (all zero without one)."""

    family_id: bytes = bytes(16)
    image_id: bytes = bytes(16)
    guest_svn: int = 0
    id_key_digest: bytes = bytes(48)
    author_key_digest: bytes = bytes(48)
    author_key_en: bool = False


def marshal_public_key(key: ec.EllipticCurvePublicKey) -> bytes:
    """The 0x404-byte SNP public key structure of a P-384 key."""
    numbers = key.public_numbers()
    body = struct.pack("<I", _CURVE_P384) + numbers.x.to_bytes(72, "little") + numbers.y.to_bytes(72, "little")
    return body.ljust(_KEY_SIZE, b"\0")


def _sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA384())))
    return (r.to_bytes(72, "little") + s.to_bytes(72, "little")).ljust(_SIG_SIZE, b"\0")


def sign_id_block(
    block: IdBlock, id_key: ec.EllipticCurvePrivateKey, author_key: ec.EllipticCurvePrivateKey | None = None
) -> bytes:
    """Build an ID_AUTH_INFO for ``block`` (what a guest owner's tooling does; used by tests and tools)."""
    auth = bytearray(ID_AUTH_SIZE)
    struct.pack_into("<II", auth, 0, _ALGO_ECDSA_P384_SHA384, _ALGO_ECDSA_P384_SHA384 if author_key else 0)
    id_pub = marshal_public_key(id_key.public_key())
    auth[_SIG_OFF : _SIG_OFF + _SIG_SIZE] = _sign(id_key, block.to_bytes())
    auth[_ID_KEY_OFF : _ID_KEY_OFF + _KEY_SIZE] = id_pub
    if author_key is not None:
        auth[_ID_KEY_SIG_OFF : _ID_KEY_SIG_OFF + _SIG_SIZE] = _sign(author_key, id_pub)
        auth[_AUTHOR_KEY_OFF : _AUTHOR_KEY_OFF + _KEY_SIZE] = marshal_public_key(author_key.public_key())
    return bytes(auth)


def _load_key(raw: bytes, what: str) -> ec.EllipticCurvePublicKey:
    curve = struct.unpack_from("<I", raw)[0]
    qx, qy = raw[4:76], raw[76:148]
    if curve != _CURVE_P384 or any(qx[48:]) or any(qy[48:]) or any(raw[148:]):
        raise FirmwareError(FirmwareStatus.INVALID_PARAM, f"{what}: not a P-384 public key structure")
    try:
        numbers = ec.EllipticCurvePublicNumbers(
            int.from_bytes(qx, "little"), int.from_bytes(qy, "little"), ec.SECP384R1()
        )
        return numbers.public_key()
    except ValueError as exc:
        raise FirmwareError(FirmwareStatus.INVALID_PARAM, f"{what}: point is not on P-384") from exc


def _verify(key: ec.EllipticCurvePublicKey, sig: bytes, data: bytes, what: str) -> None:
    r, s = int.from_bytes(sig[:72], "little"), int.from_bytes(sig[72:144], "little")
    try:
        if any(sig[144:]):
            raise InvalidSignature
        key.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        raise FirmwareError(FirmwareStatus.BAD_SIGNATURE, f"{what} does not verify") from None


def verify_id_block(
    id_block: bytes, id_auth: bytes, *, launch_digest: bytes, policy: int, author_key_en: bool
) -> LaunchIdentity:
    """LAUNCH_FINISH's ID checks: signatures, expected digest (BAD_MEASUREMENT), policy (POLICY_FAILURE)."""
    block = IdBlock.from_bytes(id_block)
    if len(id_auth) != ID_AUTH_SIZE:
        raise FirmwareError(FirmwareStatus.INVALID_LENGTH, f"ID_AUTH_INFO is {ID_AUTH_SIZE:#x} bytes")
    if block.version != 1:
        raise FirmwareError(FirmwareStatus.INVALID_PARAM, f"ID_BLOCK.VERSION {block.version} (expected 1)")
    id_algo, auth_algo = struct.unpack_from("<II", id_auth)
    if id_algo != _ALGO_ECDSA_P384_SHA384 or (author_key_en and auth_algo != _ALGO_ECDSA_P384_SHA384):
        raise FirmwareError(FirmwareStatus.INVALID_PARAM, "ID_AUTH_INFO: key algorithm is not ECDSA P-384 SHA-384")
    id_pub_raw = id_auth[_ID_KEY_OFF : _ID_KEY_OFF + _KEY_SIZE]
    id_key = _load_key(id_pub_raw, "ID_KEY")
    _verify(id_key, id_auth[_SIG_OFF : _SIG_OFF + _SIG_SIZE], id_block, "ID_BLOCK_SIG")
    author_digest = bytes(48)
    if author_key_en:
        author_raw = id_auth[_AUTHOR_KEY_OFF : _AUTHOR_KEY_OFF + _KEY_SIZE]
        author_key = _load_key(author_raw, "AUTHOR_KEY")
        _verify(author_key, id_auth[_ID_KEY_SIG_OFF : _ID_KEY_SIG_OFF + _SIG_SIZE], id_pub_raw, "ID_KEY_SIG")
        author_digest = hashlib.sha384(author_raw).digest()
    # Checked after the signatures so an unsigned block cannot probe the digest.
    if block.ld != launch_digest:
        raise FirmwareError(FirmwareStatus.BAD_MEASUREMENT, "ID_BLOCK.LD does not match the launch digest")
    if block.policy != policy:
        raise FirmwareError(FirmwareStatus.POLICY_FAILURE, f"ID_BLOCK.POLICY {block.policy:#x} != guest policy")
    return LaunchIdentity(
        family_id=block.family_id,
        image_id=block.image_id,
        guest_svn=block.guest_svn,
        id_key_digest=hashlib.sha384(id_pub_raw).digest(),
        author_key_digest=author_digest,
        author_key_en=author_key_en,
    )
