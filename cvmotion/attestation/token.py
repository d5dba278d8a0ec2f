"""attestation layer: attestation tokens — RS256 JWTs issued and verified with PyJWT, clocks passed in.

Issuing (``issue_token_at``) adds the registered claims (RFC 7519 section 4.1: ``iss``, ``iat``, ``nbf``,
``exp``, ``jti``; ``aud`` when the tenant names one) and a JOSE header ``{"alg": "RS256", "kid", "jku",
"typ": "JWT"}`` as MAA does.  Verifying (``verify_token_at``) pins the algorithm to RS256 (no ``none``, no
HMAC-with-the-public-key confusion), resolves the key by ``kid`` through a ``KeyResolver`` (a JWKS URL via
``PyJWKClient``, or a static JWKS), checks the signature, ``iss`` and ``aud`` with PyJWT, and checks the
times itself against the injected ``now`` (PyJWT would read the wall clock).  Every failure is one
``TokenError`` naming the reason; a forged signature says only "signature does not verify".
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

import jwt

from cvmotion.attestation.jwks import TOKEN_ALGORITHM
from cvmotion.attestation.keys import TokenSigningKey
from cvmotion.errors import TokenError, UsageError

__all__ = [
    "REGISTERED_CLAIMS",
    "IssuedToken",
    "JwksUrlResolver",
    "KeyResolver",
    "StaticJwks",
    "VerifiedToken",
    "decode_unverified",
    "issue_token_at",
    "verify_token_at",
]

REGISTERED_CLAIMS = ("iss", "iat", "nbf", "exp", "jti")


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A signed token and the exact claims it carries."""

    token: str
    claims: dict[str, Any]


def issue_token_at(
    claims: Mapping[str, Any],
    key: TokenSigningKey,
    now: datetime,
    lifetime: timedelta,
    *,
    issuer: str,
    audience: str | None = None,
) -> IssuedToken:
    """Sign ``claims`` plus the registered claims with ``key``; valid from ``now`` for ``lifetime``."""
    if now.tzinfo is None:
        raise UsageError("issue_token_at: 'now' must be timezone-aware")
    iat = int(now.timestamp())
    payload: dict[str, Any] = dict(claims)
    payload.update(iss=issuer, iat=iat, nbf=iat, exp=iat + int(lifetime.total_seconds()), jti=uuid.uuid4().hex)
    if audience is not None:
        payload["aud"] = audience
    token = jwt.encode(
        payload, key.private_key, algorithm=TOKEN_ALGORITHM, headers={"kid": key.kid, "jku": f"{issuer}/certs"}
    )
    return IssuedToken(token, payload)


def decode_unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims WITHOUT checking anything — for display and for picking a key only."""
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise TokenError(f"not a JWT: {exc}") from None
    return header, claims


class KeyResolver(Protocol):
    """Finds the public key that should have signed ``token`` (by its ``kid``)."""

    def key_for(self, token: str) -> Any: ...


class JwksUrlResolver:
    """Keys from a JWKS URL via ``PyJWKClient``: cached, refetched when a token names an unknown ``kid``."""

    def __init__(self, url: str, *, timeout: float = 10.0, lifespan: float = 300.0) -> None:
        self.url = url
        self._client = jwt.PyJWKClient(url, cache_keys=True, lifespan=lifespan, timeout=timeout)

    def key_for(self, token: str) -> Any:
        try:
            return self._client.get_signing_key_from_jwt(token).key
        except jwt.PyJWKClientConnectionError as exc:
            raise TokenError(f"cannot fetch the JWKS from {self.url}: {exc}") from None
        except jwt.PyJWKClientError as exc:
            raise TokenError(f"no key for this token in the JWKS at {self.url}: {exc}") from None
        except jwt.PyJWTError as exc:
            raise TokenError(f"not a JWT: {exc}") from None


class StaticJwks:
    """Keys from a JWKS document held in memory (tests, offline verification)."""

    def __init__(self, jwks: Mapping[str, Any]) -> None:
        try:
            self._set = jwt.PyJWKSet.from_dict(dict(jwks))
        except jwt.PyJWTError as exc:
            raise TokenError(f"unusable JWKS: {exc}") from None

    def key_for(self, token: str) -> Any:
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError as exc:
            raise TokenError(f"not a JWT: {exc}") from None
        for candidate in self._set.keys:
            if candidate.key_id == kid:
                return candidate.key
        raise TokenError(f"no key with kid {kid!r} in the JWKS")


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """A token whose signature, issuer, audience and times verified."""

    token: str
    header: dict[str, Any]
    claims: dict[str, Any]

    @property
    def kid(self) -> str:
        return str(self.header.get("kid", ""))

    @property
    def expires(self) -> int:
        return int(self.claims["exp"])


def verify_token_at(
    token: str,
    keys: KeyResolver,
    *,
    issuer: str,
    now: datetime,
    audience: str | None = None,
    leeway: timedelta = timedelta(seconds=30),
) -> VerifiedToken:
    """Verify ``token`` at ``now``.  ``audience=None`` accepts only tokens that carry no ``aud``.

    Raises:
        TokenError: bad form, unknown key, bad signature, wrong ``iss``/``aud``, not yet valid, expired.
    """
    if not isinstance(token, str) or token.count(".") != 2 or len(token) > 64 * 1024:
        raise TokenError("not a JWT (expected three base64url parts)")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise TokenError(f"not a JWT: {exc}") from None
    if header.get("alg") != TOKEN_ALGORITHM:
        raise TokenError(f"token algorithm {header.get('alg')!r} is not {TOKEN_ALGORITHM}")
    key = keys.key_for(token)
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[TOKEN_ALGORITHM],
            issuer=issuer,
            audience=audience,
            options={
                "verify_exp": False,  # checked below against the injected clock
                "verify_nbf": False,
                "verify_iat": False,
                "require": list(REGISTERED_CLAIMS),
            },
        )
    except jwt.InvalidSignatureError:
        raise TokenError("token signature does not verify") from None
    except jwt.InvalidIssuerError:
        raise TokenError(f"token issuer is not {issuer!r}") from None
    except (jwt.InvalidAudienceError, jwt.MissingRequiredClaimError) as exc:
        raise TokenError(f"token rejected: {exc}") from None
    except jwt.PyJWTError as exc:
        raise TokenError(f"token rejected: {exc}") from None
    for name in ("iat", "nbf", "exp"):
        if not isinstance(claims[name], int) or isinstance(claims[name], bool):
            raise TokenError(f"token claim {name!r} is not an integer NumericDate")
    t = now.timestamp()
    slack = leeway.total_seconds()
    if t + slack < claims["nbf"]:
        raise TokenError(f"token is not valid before {claims['nbf']} (now {int(t)})")
    if t - slack >= claims["exp"]:
        raise TokenError(f"token expired at {claims['exp']} (now {int(t)})")
    return VerifiedToken(token=token, header=header, claims=claims)
