"""attestation layer: the key-release service over HTTP, and its client.

```
POST /keys/{name}/release   {"target": "<attestation token>"}
     200 {"key": name, "kid": transfer-key kid, "alg": "RSA-OAEP-256", "value": base64url(wrapped secret)}
     401 token_invalid (signature, issuer, audience, expiry, evaluation time)   403 release_denied (policy)
     404 unknown_key   400 no_transfer_key / invalid_request   415 / 413 as for the attestation service
GET  /keys                  {"keys": [names]}  (OpenAPI link: each name -> its release)      GET /healthz
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
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from cvmotion.attestation.client import KeyReleaseClient
from cvmotion.attestation.http_common import (
    BODY_REFUSALS,
    EXAMPLE_JWT,
    JWT_PATTERN,
    error_response,
    install_error_handlers,
    json_response,
    read_json_body,
)
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
from cvmotion.ipc.openapi import Health, error_responses, json_body

__all__ = ["KeyReleaseClient", "KeyReleaseService", "create_app"]

log = logging.getLogger("cvmotion.attestation.keyrelease")
RelyingPartyFactory = Callable[[str], RelyingParty]
_MAX_BODY = 64 * 1024
_MAX_TOKEN = 32 * 1024


class ReleaseRequest(BaseModel):
    """The body of ``POST /keys/{name}/release``; the handler reads it itself (its own error kinds)."""

    model_config = ConfigDict(extra="forbid")

    target: str = Field(pattern=JWT_PATTERN, max_length=_MAX_TOKEN, description="the guest's attestation token (JWS)")


class ReleasedKey(BaseModel):
    key: str = Field(description="the key's name")
    kid: str = Field(description="the transfer key (from the token's x-ms-runtime) the secret is wrapped to")
    alg: Literal["RSA-OAEP-256"]
    value: str = Field(description="base64url of the wrapped secret")


class KeyNames(BaseModel):
    keys: list[str]


_RELEASE_REFUSALS = error_responses(
    {
        400: (
            "a malformed body or key name, or a token without a transfer key",
            "invalid_request",
            "malformed_json",
            "no_transfer_key",
            "bad_request",
        ),
        401: ("the token does not verify (signature, issuer, audience, expiry)", "token_invalid"),
        403: ("the key's release policy is not met (every failed condition in violations)", "release_denied"),
        404: ("no such key", "unknown_key"),
        **BODY_REFUSALS,
    }
)
_KEY_NAME = f"^{KEY_NAME.pattern}$"


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
        if len(token) > _MAX_TOKEN:
            raise ServiceError(400, "invalid_request", f"target: a token is at most {_MAX_TOKEN} characters")
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
    app = FastAPI(
        title="cvmotion key-release service",
        description="Secure key release (Azure Key Vault look-alike): a secret, wrapped to an attested guest's key.",
        version="1",
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(app)

    @app.post(
        "/keys/{name}/release",
        summary="release a key to an attested guest",
        operation_id="release_key",
        responses={200: {"model": ReleasedKey, "description": "the secret, wrapped"}, **_RELEASE_REFUSALS},
        openapi_extra=json_body(ReleaseRequest, {"target": EXAMPLE_JWT}),
    )
    async def release(
        name: Annotated[str, Path(pattern=_KEY_NAME, max_length=63, examples=["kvstore-data-key"])],
        request: Request,
    ) -> Response:
        try:
            body = await read_json_body(request, _MAX_BODY)
            # JWKS discovery and fetches block (urllib inside PyJWKClient): keep them off the event loop.
            return json_response(await run_in_threadpool(service.release, name, body))
        except ServiceError as exc:
            return error_response(exc)
        except Exception:
            log.exception("key release failed unexpectedly key=%s", name)
            return error_response(ServiceError(500, "internal", "internal error (see the service log)"))

    release_link = {
        "operationId": "release_key",
        "parameters": {"name": "$response.body#/keys/0"},
        "description": "release the first listed key",
    }

    @app.get(
        "/keys",
        summary="names of the releasable keys",
        operation_id="list_keys",
        responses={200: {"model": KeyNames, "description": "key names", "links": {"release": release_link}}},
    )
    def keys() -> Response:
        return json_response({"keys": service.store.names()})

    @app.get(
        "/healthz",
        summary="liveness",
        operation_id="healthz",
        responses={200: {"model": Health, "description": "serving"}},
    )
    def healthz() -> Response:
        return json_response({"status": "ok"})

    return app
