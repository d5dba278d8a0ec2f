"""attestation layer: the attestation service over HTTP (FastAPI) — a thin adapter around ``AttestationService``.

```
POST /attest/SevSnpVm[?tenant=NAME][&api-version=...]   application/json evidence -> 200 {"token": JWT}
GET  /certs                                            JWKS (every key whose tokens may still be valid)
GET  /.well-known/openid-configuration                 OpenID Provider Metadata (issuer, jwks_uri, claims)
GET  /healthz                                          {"status": "ok"}
```
Refusals are 4xx (502 when the KDS fails) with ``{"error": {"kind", "message"[, "violations"]}}``; an
unexpected exception is a 500 with a fixed message (details only in the server log).  The evidence handler
is ``async``: the KDS fetch awaits; verification and signing (~2 ms of CPU) run inline, since the GIL would
serialise a thread pool anyway — scale with ``--workers``.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request, Response

from cvmotion.attestation.http_common import error_response, install_error_handlers, json_response, read_json_body
from cvmotion.attestation.request import MAX_BODY
from cvmotion.attestation.service import AttestationService
from cvmotion.attestation.service_error import ServiceError

__all__ = ["create_app"]

log = logging.getLogger("cvmotion.attestation.service")
_JWKS_CACHE = "public, max-age=300"  # relying parties refetch on an unknown kid anyway


def create_app(service: AttestationService) -> FastAPI:
    app = FastAPI(
        title="cvmotion attestation service",
        description="SEV-SNP evidence -> RS256 attestation token (Microsoft Azure Attestation look-alike).",
        version="1",
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(app)

    @app.post("/attest/SevSnpVm", summary="attest SEV-SNP evidence, get a token")
    async def attest(request: Request) -> Response:
        tenant = request.query_params.get("tenant")
        try:
            body = await read_json_body(request, MAX_BODY)
        except ServiceError as exc:
            log.warning("attestation refused tenant=%s status=%d kind=%s: %s", tenant, exc.status, exc.kind, exc)
            return error_response(exc)
        try:
            result = await service.attest(body, tenant=tenant)
        except ServiceError as exc:
            return error_response(exc)  # logged by the service
        except Exception:  # never a traceback to the client, never a token
            log.exception("attestation failed unexpectedly tenant=%s", tenant)
            return error_response(ServiceError(500, "internal", "internal error (see the service log)"))
        return json_response({"token": result.token})

    @app.get("/certs", summary="JWKS of the token signing keys")
    def certs() -> Response:
        return json_response(service.jwks(), headers={"Cache-Control": _JWKS_CACHE})

    @app.get("/.well-known/openid-configuration", summary="OpenID Provider Metadata")
    def openid_configuration() -> Response:
        return json_response(service.openid_configuration())

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> Response:
        return json_response({"status": "ok"})

    return app
