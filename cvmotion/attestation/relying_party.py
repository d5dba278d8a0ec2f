"""attestation layer: the relying-party helper — verify an attestation token the way a key vault does.

```python
rp = RelyingParty.discover("http://127.0.0.1:8790", audience=None)   # OIDC metadata -> jwks_uri
verified = rp.verify(token)                                          # TokenError on any problem
rp.require(token, release_policy)                                    # + AKV-style claim conditions
```
Checks, in order: JWT form; ``alg`` = RS256; the key named by ``kid`` is in the issuer's JWKS (fetched
with PyJWT's ``PyJWKClient``, cached, refetched on an unknown ``kid`` — so a key rotation is picked up);
signature; ``iss`` equals the configured issuer; ``aud`` equals the configured audience (a token with an
``aud`` is refused when none is configured); ``nbf``/``exp`` against the injected clock with a leeway;
``x-ms-attestation-type`` is ``sevsnpvm``; and a token evaluated at an explicit time
(``x-cvmotion-evaluation-time``: a demonstration of old evidence, not a live attestation) is refused unless
``allow_evaluation_time``.  ``discover`` trusts only the issuer URL it is given: the metadata's ``issuer``
must equal it (OpenID Connect Discovery 1.0 section 4.3), and only its ``jwks_uri`` is fetched.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

import httpx

from cvmotion.attestation.claims import ATTESTATION_TYPE
from cvmotion.attestation.keys import utc_now
from cvmotion.attestation.release_policy import ReleasePolicy
from cvmotion.attestation.token import JwksUrlResolver, KeyResolver, VerifiedToken, verify_token_at
from cvmotion.errors import PolicyViolation, TokenError
from cvmotion.ipc.http_client import default_ssl_context

__all__ = ["RelyingParty"]

Clock = Callable[[], datetime]


class RelyingParty:
    """Verifies tokens of one issuer.  Thread-safe (``PyJWKClient`` locks its cache)."""

    def __init__(
        self,
        keys: KeyResolver,
        *,
        issuer: str,
        audience: str | None = None,
        clock: Clock = utc_now,
        leeway: timedelta = timedelta(seconds=30),
        allow_evaluation_time: bool = False,
    ) -> None:
        self.keys = keys
        self.issuer = issuer.rstrip("/")
        self.audience = audience
        self.leeway = leeway
        self.allow_evaluation_time = allow_evaluation_time
        self._clock = clock

    @classmethod
    def discover(
        cls,
        issuer: str,
        *,
        audience: str | None = None,
        clock: Clock = utc_now,
        timeout: float = 10.0,
        allow_evaluation_time: bool = False,
    ) -> RelyingParty:
        """Find the issuer's JWKS through ``{issuer}/.well-known/openid-configuration``.

        Raises:
            TokenError: the metadata cannot be fetched, or names another issuer.
        """
        base = issuer.rstrip("/")
        url = f"{base}/.well-known/openid-configuration"
        try:
            response = httpx.get(url, timeout=timeout, verify=default_ssl_context())
            response.raise_for_status()
            meta = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise TokenError(f"cannot fetch the OpenID metadata of {base}: {exc}") from None
        if not isinstance(meta, dict) or meta.get("issuer") != base or not isinstance(meta.get("jwks_uri"), str):
            raise TokenError(f"the OpenID metadata at {url} does not describe issuer {base!r}")
        return cls(
            JwksUrlResolver(meta["jwks_uri"], timeout=timeout),
            issuer=base,
            audience=audience,
            clock=clock,
            allow_evaluation_time=allow_evaluation_time,
        )

    def verify(self, token: str) -> VerifiedToken:
        """Verify ``token`` now.  Raises ``TokenError`` naming the first failed check."""
        verified = verify_token_at(
            token, self.keys, issuer=self.issuer, audience=self.audience, now=self._clock(), leeway=self.leeway
        )
        claims = verified.claims
        if claims.get("x-ms-attestation-type") != ATTESTATION_TYPE:
            raise TokenError(f"x-ms-attestation-type is {claims.get('x-ms-attestation-type')!r}, not sevsnpvm")
        if "x-cvmotion-evaluation-time" in claims and not self.allow_evaluation_time:
            raise TokenError(
                "token was evaluated at an explicit time "
                f"({claims['x-cvmotion-evaluation-time']}), not live; refused (allow_evaluation_time is off)"
            )
        return verified

    def require(self, token: str, policy: ReleasePolicy) -> VerifiedToken:
        """``verify`` and then every condition of ``policy`` for this issuer.

        Raises:
            TokenError: the token does not verify.
            PolicyViolation: it verifies but its claims break ``policy`` (every failed condition listed).
        """
        verified = self.verify(token)
        failures = policy.failures(self.issuer, verified.claims)
        if failures:
            raise PolicyViolation(failures)
        return verified
