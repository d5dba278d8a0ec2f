"""attestation layer: JOSE plumbing for the token service — base64url, RSA JWKs, key ids, JWKS and OIDC metadata.

Key ids are RFC 7638 JWK thumbprints (SHA-256 over the canonical ``{"e","kty","n"}`` JSON), so a ``kid`` is a
pure function of the public key: two processes that load the same key agree on its id without coordination,
and a relying party can recompute it.  The JWKS document is what ``GET /certs`` serves (MAA's path) and the
OpenID Provider Metadata (OpenID Connect Discovery 1.0 section 3) what ``GET /.well-known/openid-configuration``
serves, so stock JOSE clients (PyJWT's ``PyJWKClient``, ``jose``, ``jwt.io``) find the keys on their own.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterable
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from cvmotion.errors import MalformedStructure

__all__ = [
    "TOKEN_ALGORITHM",
    "b64url_decode",
    "b64url_encode",
    "jwk_thumbprint",
    "jwks_document",
    "openid_configuration",
    "rsa_public_jwk",
    "rsa_public_key_from_jwk",
]

TOKEN_ALGORITHM = "RS256"  # RSASSA-PKCS1-v1_5 with SHA-256 (RFC 7518 section 3.3), what MAA signs with
_B64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")


def b64url_encode(data: bytes) -> str:
    """Unpadded base64url (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str, *, what: str, max_len: int | None = None) -> bytes:
    """Strict base64url decoding; padding optional.  Any character outside the alphabet is an error.

    Raises:
        MalformedStructure: naming ``what`` and the problem.
    """
    if max_len is not None and len(text) > (max_len * 4 + 2) // 3 + 2:
        raise MalformedStructure(f"{what}: longer than {max_len} bytes")
    if not _B64URL.fullmatch(text):
        bad = next((i for i, c in enumerate(text) if not (c.isascii() and (c.isalnum() or c in "-_="))), 0)
        raise MalformedStructure(f"{what}: not base64url (character {bad} is {text[bad : bad + 1]!r})")
    stripped = text.rstrip("=")
    if len(stripped) % 4 == 1:
        raise MalformedStructure(f"{what}: not base64url (length {len(stripped)} is impossible)")
    try:
        return base64.b64decode(stripped + "=" * (-len(stripped) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedStructure(f"{what}: not base64url ({exc})") from None


def _uint(value: int) -> str:
    return b64url_encode(value.to_bytes((value.bit_length() + 7) // 8 or 1, "big"))


def rsa_public_jwk(key: rsa.RSAPublicKey) -> dict[str, str]:
    """The RFC 7517/7518 JWK members of an RSA public key (``kty``, ``n``, ``e``), without a ``kid``."""
    numbers = key.public_numbers()
    return {"kty": "RSA", "n": _uint(numbers.n), "e": _uint(numbers.e)}


def rsa_public_key_from_jwk(jwk: dict[str, Any], *, what: str = "JWK") -> rsa.RSAPublicKey:
    """Parse an RSA public JWK (``kty`` RSA, ``n``, ``e``).

    Raises:
        MalformedStructure: not an RSA JWK, or ``n``/``e`` not base64url integers.
    """
    if not isinstance(jwk, dict) or jwk.get("kty") != "RSA":
        raise MalformedStructure(f"{what}: not an RSA JWK (kty must be 'RSA')")
    n_text, e_text = jwk.get("n"), jwk.get("e")
    if not isinstance(n_text, str) or not isinstance(e_text, str):
        raise MalformedStructure(f"{what}: 'n' and 'e' must be base64url strings")
    n = int.from_bytes(b64url_decode(n_text, what=f"{what}.n", max_len=1024), "big")
    e = int.from_bytes(b64url_decode(e_text, what=f"{what}.e", max_len=8), "big")
    try:
        return rsa.RSAPublicNumbers(e, n).public_key()
    except ValueError as exc:
        raise MalformedStructure(f"{what}: not a usable RSA key ({exc})") from None


def jwk_thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638 SHA-256 thumbprint of an RSA JWK: the required members, sorted, no whitespace."""
    canonical = json.dumps({"e": jwk["e"], "kty": jwk["kty"], "n": jwk["n"]}, separators=(",", ":"), sort_keys=True)
    return b64url_encode(hashlib.sha256(canonical.encode()).digest())


def jwks_document(keys: Iterable[tuple[str, rsa.RSAPublicKey]]) -> dict[str, Any]:
    """``{"keys": [...]}`` with ``kid``, ``use: sig`` and ``alg: RS256`` on each key (RFC 7517 section 5)."""
    return {"keys": [{**rsa_public_jwk(key), "kid": kid, "use": "sig", "alg": TOKEN_ALGORITHM} for kid, key in keys]}


def openid_configuration(issuer: str, claims: Iterable[str]) -> dict[str, Any]:
    """OpenID Provider Metadata for an attestation token issuer (the subset MAA publishes)."""
    return {
        "issuer": issuer,
        "jwks_uri": f"{issuer}/certs",
        "response_types_supported": ["token", "none"],
        "id_token_signing_alg_values_supported": [TOKEN_ALGORITHM],
        "token_endpoint_auth_methods_supported": ["none"],
        "claims_supported": sorted(claims),
    }
