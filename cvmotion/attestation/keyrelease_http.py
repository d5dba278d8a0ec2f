"""attestation layer: the key-release service over HTTP, and its client.

```
POST /keys/{name}/release   {"target": "<attestation token>"}
     200 {"key": name, "kid": transfer-key kid, "alg": "RSA-OAEP-256", "value": base64url(wrapped secret)}
     401 token_invalid (signature, issuer, audience, expiry, evaluation time)   403 release_denied (policy)
     404 unknown_key   400 no_transfer_key / invalid_request   415 / 413 as for the attestation service
GET  /keys                  {"keys": [names]}      GET /healthz
```
The token's (unverified) ``iss`` only *selects* an authority listed in the key's release policy; a token
naming any other issuer is refused before anything is fetched, so a client cannot make the service fetch
from arbitrary URLs.  Each authority's JWKS is discovered once (OIDC metadata) and cached by ``PyJWKClient``.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool

from cvmotion.attestation.client import KeyReleaseClient
from cvmotion.attestation.http_common import error_response, install_error_handlers, json_response, read_json_body
from cvmotion.attestation.keyrelease import (
    KEY_NAME,
    WRAP_ALGORITHM,
    KeyStore,
    transfer_key_from_claims,
    wrap_secret,
)
from cvmotion.attestation.relying_party import RelyingParty
from cvmotion.attestation.service_error import ServiceError
from cvmotion.attestation.token import decode_unverified
from cvmotion.errors import PolicyViolation, TokenError, UsageError

__all__ = ["KeyReleaseClient", "KeyReleaseService", "create_app"]

log = logging.getLogger("cvmotion.attestation.keyrelease")
RelyingPartyFactory = Callable[[str], RelyingParty]
_MAX_BODY = 64 * 1024


class KeyReleaseService:
    """Release decisions, independent of HTTP.  ``relying_party(issuer)`` builds the verifier of one authority."""

    def __init__(self, store: KeyStore, *, relying_party: RelyingPartyFactory) -> None:
        self.store = store
        self._factory = relying_party
        self._parties: dict[str, RelyingParty] = {}
        self._lock = threading.Lock()

    def _party(self, issuer: str) -> RelyingParty:
        with self._lock:
            party = self._parties.get(issuer)
        if party is None:
            party = self._factory(issuer)
            with self._lock:
                party = self._parties.setdefault(issuer, party)
        return party

    def release(self, name: str, body: bytes) -> dict[str, Any]:
        """Decide one release.  Raises ``ServiceError`` (and logs) on every refusal."""
        try:
            result = self._release(name, body)
        except ServiceError as exc:
            log.warning("key release refused key=%s status=%d kind=%s: %s", name, exc.status, exc.kind, exc)
            raise
        log.info("key released key=%s to transfer key %s (token jti=%s)", name, result["kid"], result["jti"])
        return {k: v for k, v in result.items() if k != "jti"}

    def _release(self, name: str, body: bytes) -> dict[str, Any]:
        key = self.store.get(name) if KEY_NAME.fullmatch(name) else None
        if key is None:
            raise ServiceError(404, "unknown_key", f"no key named {name!r}")
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ServiceError(400, "malformed_json", f"request body is not JSON: {exc}") from None
        token = doc.get("target") if isinstance(doc, dict) else None
        if not isinstance(token, str) or set(doc) != {"target"}:
            raise ServiceError(400, "invalid_request", 'body must be exactly {"target": "<attestation token>"}')
        try:
            issuer = str(decode_unverified(token)[1].get("iss", ""))
        except TokenError as exc:
            raise ServiceError(401, "token_invalid", str(exc)) from None
        if issuer.rstrip("/") not in key.policy.authorities:
            raise ServiceError(403, "release_denied", f"issuer {issuer!r} is not an authority for key {name!r}")
        try:
            verified = self._party(issuer.rstrip("/")).require(token, key.policy)
        except TokenError as exc:
            raise ServiceError(401, "token_invalid", str(exc)) from None
        except PolicyViolation as exc:
            raise ServiceError(
                403, "release_denied", f"release policy of {name!r} not met: {exc}", violations=exc.violations
            ) from None
        try:
            kid, transfer = transfer_key_from_claims(verified.claims)
        except UsageError as exc:
            raise ServiceError(400, "no_transfer_key", str(exc)) from None
        return {
            "key": name,
            "kid": kid,
            "alg": WRAP_ALGORITHM,
            "value": wrap_secret(key.secret, transfer),
            "jti": verified.claims.get("jti"),
        }


def create_app(service: KeyReleaseService) -> FastAPI:
    app = FastAPI(title="cvmotion key-release service", version="1", docs_url=None, redoc_url=None)
    install_error_handlers(app)

    @app.post("/keys/{name}/release", summary="release a key to an attested guest")
    async def release(name: str, request: Request) -> Response:
        try:
            body = await read_json_body(request, _MAX_BODY)
            # JWKS discovery and fetches block (urllib inside PyJWKClient): keep them off the event loop.
            return json_response(await run_in_threadpool(service.release, name, body))
        except ServiceError as exc:
            return error_response(exc)
        except Exception:
            log.exception("key release failed unexpectedly key=%s", name)
            return error_response(ServiceError(500, "internal", "internal error (see the service log)"))

    @app.get("/keys", summary="names of the releasable keys")
    def keys() -> Response:
        return json_response({"keys": service.store.names()})

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> Response:
        return json_response({"status": "ok"})

    return app
