"""attestation layer: the attestation service over HTTP (FastAPI) — a thin adapter around ``AttestationService``.

```
POST /attest/SevSnpVm[?tenant=NAME]                    application/json evidence -> 200 {"token": JWT}
GET  /certs                                            JWKS (every key whose tokens may still be valid)
GET  /.well-known/openid-configuration                 OpenID Provider Metadata (issuer, jwks_uri, claims)
GET  /healthz                                          {"status": "ok"}
```
Refusals are 4xx (502 when the KDS fails) with ``{"error": {"kind", "message"[, "violations"]}}``; an
unexpected exception is a 500 with a fixed message (details only in the server log).  The OpenAPI document
(``/openapi.json``) names every status and constraint; the evidence's bytes (a signed report, a PEM chain)
cannot be written in JSON Schema, so schema-valid evidence may still be a documented 400.  Other query
parameters (MAA's ``api-version``) are ignored.  The evidence handler
is ``async``: the KDS fetch awaits; verification and signing (~2 ms of CPU) run inline, since the GIL would
serialise a thread pool anyway — scale with ``--workers``.
"""

from __future__ import annotations

import logging
from typing import Annotated, Literal

from fastapi import FastAPI, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from cvmotion.attestation.http_common import (
    BODY_REFUSALS,
    EXAMPLE_JWT,
    JWT_PATTERN,
    error_response,
    install_error_handlers,
    json_response,
    read_json_body,
)
from cvmotion.attestation.request import EVIDENCE_EXAMPLE, MAX_BODY, EvidenceRequest
from cvmotion.attestation.service import AttestationService
from cvmotion.attestation.service_error import ServiceError
from cvmotion.attestation.tenants import DEFAULT_TENANT, TENANT_NAME
from cvmotion.ipc.openapi import Health, error_responses, json_body

__all__ = ["create_app"]

log = logging.getLogger("cvmotion.attestation.service")
_JWKS_CACHE = "public, max-age=300"  # relying parties refetch on an unknown kid anyway


class TokenAnswer(BaseModel):
    token: str = Field(pattern=JWT_PATTERN, description="RS256 JWT with MAA's sevsnpvm claims", examples=[EXAMPLE_JWT])


class Jwk(BaseModel):
    kty: Literal["RSA"]
    kid: str = Field(description="RFC 7638 thumbprint")
    use: Literal["sig"]
    alg: Literal["RS256"]
    n: str
    e: str


class Jwks(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"keys": [{"kty": "RSA", "kid": "k1", "use": "sig", "alg": "RS256", "n": "0vx7...", "e": "AQAB"}]}
            ]
        }
    )

    keys: list[Jwk] = Field(description="the active key and every retired key whose tokens may still be valid")


class OpenIdConfiguration(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "issuer": "http://127.0.0.1:8790",
                    "jwks_uri": "http://127.0.0.1:8790/certs",
                    "response_types_supported": ["token", "none"],
                    "id_token_signing_alg_values_supported": ["RS256"],
                    "token_endpoint_auth_methods_supported": ["none"],
                    "claims_supported": ["x-ms-attestation-type", "x-cvmotion-platform"],
                }
            ]
        }
    )

    issuer: str
    jwks_uri: str
    response_types_supported: list[str]
    id_token_signing_alg_values_supported: list[str]
    token_endpoint_auth_methods_supported: list[str]
    claims_supported: list[str]


def _ok(model: type[BaseModel], description: str) -> dict[int | str, dict[str, object]]:
    return {200: {"model": model, "description": description}}


_ATTEST_REFUSALS = error_responses(
    {
        400: (
            "the request or the evidence is malformed, does not verify, or does not bind its runtime data",
            "malformed_json",
            "invalid_request",
            "invalid_base64",
            "malformed_report",
            "malformed_certificate",
            "invalid_runtime_data",
            "verification_failed",
            "runtime_data_mismatch",
            "runtime_data_required",
            "evaluation_time_not_allowed",
            "endorsement_required",
            "endorsement_not_found",
            "bad_request",
        ),
        403: ("the evidence breaks the tenant's attestation policy (every rule in violations)", "policy_violation"),
        404: ("no such tenant", "unknown_tenant"),
        **BODY_REFUSALS,
        502: ("the KDS (--kds) failed to answer the endorsements", "kds_unavailable"),
    }
)


def create_app(service: AttestationService) -> FastAPI:
    app = FastAPI(
        title="cvmotion attestation service",
        description="SEV-SNP evidence -> RS256 attestation token (Microsoft Azure Attestation look-alike).",
        version="1",
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(app)

    @app.post(
        "/attest/SevSnpVm",
        summary="attest SEV-SNP evidence, get a token",
        operation_id="attest_sev_snp_vm",
        responses={**_ok(TokenAnswer, "the attestation token"), **_ATTEST_REFUSALS},
        openapi_extra=json_body(EvidenceRequest, EVIDENCE_EXAMPLE),
    )
    async def attest(
        request: Request,
        tenant: Annotated[
            str, Query(pattern=f"^{TENANT_NAME.pattern}$", max_length=63, description="whose policy applies")
        ] = DEFAULT_TENANT,
    ) -> Response:
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

    @app.get(
        "/certs",
        summary="JWKS of the token signing keys",
        operation_id="jwks",
        responses=_ok(Jwks, "JWKS (Cache-Control: public, max-age=300)"),
    )
    def certs() -> Response:
        return json_response(service.jwks(), headers={"Cache-Control": _JWKS_CACHE})

    @app.get(
        "/.well-known/openid-configuration",
        summary="OpenID Provider Metadata",
        operation_id="openid_configuration",
        responses=_ok(OpenIdConfiguration, "issuer, jwks_uri, algorithms, supported claims"),
    )
    def openid_configuration() -> Response:
        return json_response(service.openid_configuration())

    @app.get("/healthz", summary="liveness", operation_id="healthz", responses=_ok(Health, "serving"))
    def healthz() -> Response:
        return json_response({"status": "ok"})

    return app
