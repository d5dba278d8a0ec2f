"""attestation layer: secure key release — a relying party that hands a secret only to an attested guest.

Modelled on Azure Key Vault's secure key release (SKR) for confidential VMs::

    guest (in the TEE)                          attestation service             key-release service
    ──────────────────                          ───────────────────             ───────────────────
    TransferKey.generate()  (RSA, never leaves the TEE)
    report_data = SHA-256(runtime_data) ‖ 0³²,  runtime_data = {"keys": [transfer JWK]}
    ── evidence + runtime_data (JSON) ────────► verify, policy, token with
                                                x-ms-runtime.keys = [transfer JWK]
    ◄── token ──────────────────────────────────
    ── POST /keys/{name}/release {"target": token} ──────────────────────────► verify token (JWKS of an
                                                                                authority in the key's
                                                                                release policy), evaluate
                                                                                the policy, wrap the secret
                                                                                RSA-OAEP-256 to the JWK
    ◄── {"value": wrapped, "alg": "RSA-OAEP-256", "kid"} ─────────────────────
    TransferKey.unwrap(value) -> secret

The token is not a bearer credential for the secret: the secret is encrypted to a key whose hash the
hardware signed into REPORT_DATA, so whoever replays a stolen token gets ciphertext only.  After a live
migration the guest re-attests on the new host (new CHIP_ID, TCB) and gets a new token with the same
runtime claims; a release policy that pins measurement and policy bits, not chips, keeps releasing.

``DATA_DIR/keys/<name>.json`` (0600): ``{"name", "secret": base64url, "release_policy": {...}, "created"}``.
Secrets are stored in the clear under file permissions (an HSM would hold them in production).
"""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from cvmotion.attestation.jwks import b64url_decode, b64url_encode, jwk_thumbprint, rsa_public_jwk
from cvmotion.attestation.jwks import rsa_public_key_from_jwk as _jwk_key
from cvmotion.attestation.release_policy import ReleasePolicy
from cvmotion.errors import AbiError, CvmError, UsageError

__all__ = [
    "KEY_NAME",
    "WRAP_ALGORITHM",
    "KeyStore",
    "ReleasableKey",
    "TransferKey",
    "transfer_key_from_claims",
    "wrap_secret",
]

KEY_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
WRAP_ALGORITHM = "RSA-OAEP-256"  # RFC 7518 section 4.3: RSAES-OAEP with SHA-256 and MGF1-SHA-256
_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
MIN_TRANSFER_BITS = 2048
MAX_SECRET = 190  # RSA-2048 OAEP-SHA-256 carries at most 256 - 2*32 - 2 bytes


class TransferKey:
    """The guest's ephemeral RSA key the released secret is wrapped to (AKV's "transfer key")."""

    def __init__(self, private_key: rsa.RSAPrivateKey, kid: str = "TransferKey") -> None:
        self.private_key = private_key
        self.kid = kid

    @classmethod
    def generate(cls, bits: int = 2048, kid: str = "TransferKey") -> TransferKey:
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=bits), kid)

    def jwk(self) -> dict[str, Any]:
        return {**rsa_public_jwk(self.private_key.public_key()), "kid": self.kid, "key_ops": ["encrypt"]}

    def runtime_data(self) -> bytes:
        """The JSON runtime data to attest with (``dataType: JSON``): ``{"keys": [this JWK]}``."""
        return json.dumps({"keys": [self.jwk()]}, separators=(",", ":")).encode()

    def unwrap(self, value: str) -> bytes:
        try:
            return self.private_key.decrypt(b64url_decode(value, what="wrapped key", max_len=1024), _OAEP)
        except (ValueError, AbiError):
            raise UsageError("the wrapped key does not decrypt with this transfer key") from None


def transfer_key_from_claims(claims: dict[str, Any]) -> tuple[str, rsa.RSAPublicKey]:
    """The first RSA key in the token's ``x-ms-runtime.keys`` (kid, key).

    Raises:
        UsageError: no such key, or one shorter than RSA-2048.
    """
    runtime = claims.get("x-ms-runtime")
    keys = runtime.get("keys") if isinstance(runtime, dict) else None
    if not isinstance(keys, list):
        raise UsageError("the token carries no x-ms-runtime.keys (attest with a transfer key as JSON runtime data)")
    for i, jwk in enumerate(keys):
        if isinstance(jwk, dict) and jwk.get("kty") == "RSA":
            try:
                key = _jwk_key(jwk, what=f"x-ms-runtime.keys[{i}]")
            except AbiError as exc:
                raise UsageError(str(exc)) from None
            if key.key_size < MIN_TRANSFER_BITS:
                raise UsageError(f"x-ms-runtime.keys[{i}] is RSA-{key.key_size}; at least {MIN_TRANSFER_BITS}")
            kid = jwk.get("kid")
            return (kid if isinstance(kid, str) else jwk_thumbprint(rsa_public_jwk(key))), key
    raise UsageError("x-ms-runtime.keys holds no RSA key to wrap the secret to")


def wrap_secret(secret: bytes, key: rsa.RSAPublicKey) -> str:
    return b64url_encode(key.encrypt(secret, _OAEP))


@dataclass(frozen=True, slots=True)
class ReleasableKey:
    name: str
    secret: bytes
    policy: ReleasePolicy
    policy_doc: dict[str, Any]
    created: str


class KeyStore:
    """Secrets and their release policies under ``DATA_DIR/keys``; read once at start (``reload`` re-reads)."""

    def __init__(self, data_dir: Path) -> None:
        self.directory = Path(data_dir) / "keys"
        self._keys: dict[str, ReleasableKey] = {}
        self.reload()

    def reload(self) -> None:
        keys: dict[str, ReleasableKey] = {}
        if self.directory.is_dir():
            for path in sorted(self.directory.glob("*.json")):
                key = _load_key(path)
                keys[key.name] = key
        self._keys = keys

    def get(self, name: str) -> ReleasableKey | None:
        return self._keys.get(name)

    def names(self) -> list[str]:
        return sorted(self._keys)

    def create(self, name: str, policy_doc: dict[str, Any], secret: bytes | None = None) -> ReleasableKey:
        """Add a key (random 32 bytes unless ``secret``); refuses to overwrite an existing one."""
        if not KEY_NAME.fullmatch(name):
            raise UsageError(f"key name {name!r} is not [a-z0-9-] (1-63 characters)")
        value = secret if secret is not None else secrets.token_bytes(32)
        if not 1 <= len(value) <= MAX_SECRET:
            raise UsageError(f"a secret is 1..{MAX_SECRET} bytes (it is wrapped with RSA-OAEP in one block)")
        policy = ReleasePolicy.from_json(policy_doc, source=f"release policy of {name}")
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.directory / f"{name}.json"
        created = datetime.now(UTC).isoformat()
        doc = {
            "name": name,
            "secret": b64url_encode(value),
            "release_policy": policy_doc,
            "created": created,
        }
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise UsageError(f"key {name!r} already exists ({path})") from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(doc, indent=2) + "\n")
        key = ReleasableKey(name, value, policy, policy_doc, created)
        self._keys[name] = key
        return key


def _load_key(path: Path) -> ReleasableKey:
    try:
        doc = json.loads(path.read_bytes())
        name, secret, policy_doc = doc["name"], doc["secret"], doc["release_policy"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"key file {path} is unreadable or incomplete: {exc!r}") from None
    if name != path.stem or not isinstance(secret, str) or not isinstance(policy_doc, dict):
        raise UsageError(f"key file {path}: name, secret or release_policy is wrong")
    try:
        value = b64url_decode(secret, what=f"{path} secret")
    except CvmError as exc:
        raise UsageError(str(exc)) from None
    policy = ReleasePolicy.from_json(policy_doc, source=f"{path} release_policy")
    return ReleasableKey(name, value, policy, policy_doc, str(doc.get("created", "")))
