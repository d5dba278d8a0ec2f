"""attestation layer: the token service's RS256 signing keys — persisted, rotated with overlap, shared by workers.

```
DATA_DIR/signing-keys/
  state.json        {"format": 1, "active": KID, "overlap_s": N, "keys": [{"kid", "bits", "created",
                     "retired": ISO|null, "publish_until": ISO|null}]}
  <kid>.pem         PKCS#8 private key, created 0600
  .lock             flock: one writer at a time (several worker processes share the directory)
```
Rotation (``rotate``): a new key becomes **active** (signs every new token); the previous one is
**retired** but stays in the JWKS until ``publish_until = retired + overlap``, where the overlap is the
longest token lifetime the service issues plus a clock-skew margin — so every token it ever signed can be
verified until it expires, and relying parties that cache the JWKS see the new key before they need it
(``PyJWKClient`` refetches on an unknown ``kid``).  Keys past ``publish_until`` are deleted (``prune``).

Readers in other processes notice a rotation by the state file's identity (inode, size, mtime): every
write is an atomic rename, so ``refresh`` either sees the old or the new state, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from cvmotion.attestation.jwks import jwk_thumbprint, rsa_public_jwk
from cvmotion.errors import UsageError
from cvmotion.files import PRIVATE, dir_lock, write_atomic

__all__ = ["KEY_SIZES", "SigningKeyStore", "TokenSigningKey", "utc_now"]

KEY_SIZES = (2048, 3072)  # RS256 with RSA-2048 is what MAA uses; 3072 for a longer-lived issuer
_STATE = "state.json"
_FORMAT = 1
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class TokenSigningKey:
    """One RS256 key: ``kid`` (RFC 7638 thumbprint), the private key, and its place in the rotation."""

    kid: str
    private_key: rsa.RSAPrivateKey = field(repr=False)
    bits: int
    created: datetime
    retired: datetime | None = None
    publish_until: datetime | None = None

    @property
    def public_key(self) -> rsa.RSAPublicKey:
        return self.private_key.public_key()

    def published_at(self, now: datetime) -> bool:
        return self.publish_until is None or now < self.publish_until

    def _meta(self) -> dict[str, Any]:
        return {
            "kid": self.kid,
            "bits": self.bits,
            "created": self.created.isoformat(),
            "retired": _iso(self.retired),
            "publish_until": _iso(self.publish_until),
        }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _parse_time(value: object, what: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise UsageError(f"signing key state: {what} is not an ISO 8601 string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"signing key state: {what} {value!r} is not ISO 8601") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


class SigningKeyStore:
    """The signing keys under one directory.  Thread-safe; several processes may share the directory."""

    def __init__(self, directory: Path, *, bits: int = 2048, overlap: timedelta, clock: Clock = utc_now) -> None:
        if bits not in KEY_SIZES:
            raise UsageError(f"token signing key size {bits} is not one of {', '.join(map(str, KEY_SIZES))}")
        if overlap <= timedelta(0):
            raise UsageError("the key overlap must be positive (the longest token lifetime plus clock skew)")
        self.directory = Path(directory)
        self.bits = bits
        self.overlap = overlap
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str, TokenSigningKey] = {}
        self._active = ""
        self._identity: tuple[int, int, int] | None = None

    @classmethod
    def open(cls, directory: Path, *, bits: int = 2048, overlap: timedelta, clock: Clock = utc_now) -> SigningKeyStore:
        """Load the keys in ``directory``, creating the first key if there is none."""
        store = cls(directory, bits=bits, overlap=overlap, clock=clock)
        store.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with store._flock():
            if not (store.directory / _STATE).exists():
                key = store._new_key(clock())
                store._keys, store._active = {key.kid: key}, key.kid
                store._save()
        store.refresh(force=True)
        return store

    # -- reading ---------------------------------------------------------------------------------

    @property
    def active(self) -> TokenSigningKey:
        with self._lock:
            return self._keys[self._active]

    def published(self, now: datetime | None = None) -> list[TokenSigningKey]:
        """Keys a relying party may need: the active one and every retired one still inside its overlap."""
        at = now if now is not None else self._clock()
        with self._lock:
            active = self._active
            keys = [k for k in self._keys.values() if k.kid == active or k.published_at(at)]
        return sorted(keys, key=lambda k: (k.kid == active, k.created), reverse=True)  # active first, then newest

    def refresh(self, *, force: bool = False) -> bool:
        """Reload the state if another process rewrote it; True when something changed."""
        path = self.directory / _STATE
        try:
            st = path.stat()
        except FileNotFoundError:
            raise UsageError(f"signing key state {path} has disappeared") from None
        identity = (st.st_ino, st.st_size, st.st_mtime_ns)
        if not force and identity == self._identity:
            return False
        keys, active = self._load(path)
        with self._lock:
            self._keys, self._active, self._identity = keys, active, identity
        return True

    def _load(self, path: Path) -> tuple[dict[str, TokenSigningKey], str]:
        try:
            doc = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise UsageError(f"signing key state {path} is unreadable: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT or not isinstance(doc.get("keys"), list):
            raise UsageError(f"signing key state {path}: not format {_FORMAT}")
        keys: dict[str, TokenSigningKey] = {}
        for meta in doc["keys"]:
            kid = meta.get("kid") if isinstance(meta, dict) else None
            if not isinstance(kid, str) or not kid or "/" in kid or kid.startswith("."):
                raise UsageError(f"signing key state {path}: bad kid {kid!r}")
            keys[kid] = self._load_key(kid, meta)
        active = doc.get("active")
        if not isinstance(active, str) or active not in keys:
            raise UsageError(f"signing key state {path}: the active key {active!r} is not listed")
        return keys, active

    def _load_key(self, kid: str, meta: dict[str, Any]) -> TokenSigningKey:
        pem_path = self.directory / f"{kid}.pem"
        existing = self._keys.get(kid)
        if existing is not None:  # private keys never change under a kid; only the rotation dates do
            private = existing.private_key
        else:
            try:
                loaded = serialization.load_pem_private_key(pem_path.read_bytes(), password=None)
            except (OSError, ValueError) as exc:
                raise UsageError(f"signing key {pem_path}: cannot load ({exc})") from None
            if not isinstance(loaded, rsa.RSAPrivateKey):
                raise UsageError(f"signing key {pem_path} is not an RSA key")
            private = loaded
        if jwk_thumbprint(rsa_public_jwk(private.public_key())) != kid:
            raise UsageError(f"signing key {pem_path} does not match its kid (JWK thumbprint)")
        created = _parse_time(meta.get("created"), f"{kid}.created")
        if created is None:
            raise UsageError(f"signing key state: {kid} has no creation time")
        return TokenSigningKey(
            kid=kid,
            private_key=private,
            bits=private.key_size,
            created=created,
            retired=_parse_time(meta.get("retired"), f"{kid}.retired"),
            publish_until=_parse_time(meta.get("publish_until"), f"{kid}.publish_until"),
        )

    # -- writing ---------------------------------------------------------------------------------

    def _flock(self) -> contextlib.AbstractContextManager[None]:
        return dir_lock(self.directory)

    def _new_key(self, now: datetime) -> TokenSigningKey:
        private = rsa.generate_private_key(public_exponent=65537, key_size=self.bits)
        kid = jwk_thumbprint(rsa_public_jwk(private.public_key()))
        pem = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_atomic(self.directory / f"{kid}.pem", pem, mode=PRIVATE)
        return TokenSigningKey(kid=kid, private_key=private, bits=self.bits, created=now)

    def _save(self) -> None:
        doc = {
            "format": _FORMAT,
            "active": self._active,
            "overlap_s": int(self.overlap.total_seconds()),
            "keys": [k._meta() for k in sorted(self._keys.values(), key=lambda k: k.created)],
        }
        write_atomic(self.directory / _STATE, (json.dumps(doc, indent=2) + "\n").encode())

    def rotate(self, now: datetime | None = None) -> TokenSigningKey:
        """Make a new key active; the old one stays published for ``overlap``.  Returns the new key."""
        at = now if now is not None else self._clock()
        with self._flock():
            self.refresh()
            return self._rotate_locked(at)

    def _rotate_locked(self, at: datetime) -> TokenSigningKey:
        new = self._new_key(at)
        with self._lock:
            old = self._keys[self._active]
            self._keys[old.kid] = replace(old, retired=at, publish_until=at + self.overlap)
            self._keys[new.kid], self._active = new, new.kid
            self._save()
        self.refresh(force=True)
        return new

    def rotate_if_older_than(self, age: timedelta, now: datetime | None = None) -> TokenSigningKey | None:
        """Automatic rotation: rotate when the active key is at least ``age`` old (re-checked under the lock)."""
        at = now if now is not None else self._clock()
        if at - self.active.created < age:
            return None
        with self._flock():
            self.refresh()
            if at - self.active.created < age:  # another worker rotated first
                return None
            return self._rotate_locked(at)

    def prune(self, now: datetime | None = None) -> list[str]:
        """Delete retired keys whose overlap has ended; returns their kids."""
        at = now if now is not None else self._clock()
        with self._flock():
            self.refresh()
            with self._lock:
                gone = [k.kid for k in self._keys.values() if k.kid != self._active and not k.published_at(at)]
                if not gone:
                    return []
                for kid in gone:
                    del self._keys[kid]
                self._save()
            for kid in gone:
                with contextlib.suppress(FileNotFoundError):
                    (self.directory / f"{kid}.pem").unlink()
            self.refresh(force=True)
        return gone
