"""The attestation service over its HTTP API (FastAPI httpx.Client): genuine and emulated evidence, and every
kind of bad input — each a 4xx with {"error": {"kind", "message"}}, the service keeps serving, and nothing
is logged as a success."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from attsvc_support import (
    DEBUG_POLICY,
    FakeClock,
    Guest,
    body,
    emulated_trust,
    launch,
    make_service,
    new_sp,
    real_chain_pem,
    serve_app,
)

from cvmotion.abi.snp import Product
from cvmotion.attestation.jwks import b64url_encode
from cvmotion.attestation.policy import AttestationPolicy
from cvmotion.attestation.request import MAX_BODY
from cvmotion.attestation.service_http import create_app
from cvmotion.attestation.tenants import TenantConfig
from cvmotion.firmware.vendor import Vendor

STRICT = AttestationPolicy.model_validate({"minimum_tcb": {"snp": 26}, "allow_debug": False})
AT_GENOA = "2025-09-12T00:00:00+00:00"


@pytest.fixture(scope="module")
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="module")
def guest(emulated_vendor: Vendor, tmp_path_factory: pytest.TempPathFactory) -> Guest:
    return launch(new_sp(emulated_vendor, tmp_path_factory.mktemp("attsvc-host")))


@pytest.fixture(scope="module")
def client(
    emulated_vendor: Vendor, tmp_path_factory: pytest.TempPathFactory, clock: FakeClock
) -> Iterator[httpx.Client]:
    service = make_service(
        tmp_path_factory.mktemp("attsvc"),
        emulated_trust(emulated_vendor),
        clock,
        tenants={
            "strict": TenantConfig(policy=STRICT),
            "needs-rtd": TenantConfig(require_runtime_data=True),
            "lenient": TenantConfig(policy=AttestationPolicy.model_validate({"allow_debug": True})),
            "audit": TenantConfig(policy=STRICT, mode="report"),
        },
        allow_evaluation_time=True,
    )
    with serve_app(create_app(service)) as tc:
        yield tc


def _post(client: httpx.Client, data: bytes, tenant: str | None = None, **kw: Any) -> Any:
    headers = kw.pop("headers", {"Content-Type": "application/json"})
    params = {"tenant": tenant} if tenant else None
    return client.post("/attest/SevSnpVm", content=data, headers=headers, params=params, **kw)


def _claims(client: httpx.Client, response: Any) -> dict[str, Any]:
    """Verify the token with PyJWT directly against the service's JWKS (a standard JWT library, no cvmotion code)."""
    assert response.status_code == 200, response.text
    token = response.json()["token"]
    jwks = jwt.PyJWKSet.from_dict(client.get("/certs").json())
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in jwks.keys if k.key_id == kid)
    return jwt.decode(token, key.key, algorithms=["RS256"], issuer="http://attest.test", options={"verify_exp": False})


# --- genuine AMD evidence -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "tenant", "at"), [("genoa", None, AT_GENOA), ("milan", "lenient", "2025-01-01")])
def test_real_vectors_yield_amd_tokens(
    client: httpx.Client, real: dict[str, Any], name: str, tenant: Any, at: str
) -> None:
    ev = real[name]
    claims = _claims(client, _post(client, body(ev.raw, real_chain_pem(ev), at=datetime.fromisoformat(at)), tenant))
    assert claims["x-cvmotion-platform"] == "amd-sev-snp"
    assert claims["x-cvmotion-product"] == ev.product.value
    assert claims["x-ms-attestation-type"] == "sevsnpvm"
    assert claims["x-ms-compliance-status"] == "cvmotion-compliant-cvm"
    assert claims["x-ms-sevsnpvm-chipid"] == ev.raw[0x1A0:0x1E0].hex()
    assert claims["x-ms-sevsnpvm-launchmeasurement"] == ev.raw[0x90:0xC0].hex()
    assert claims["x-cvmotion-evaluation-time"].startswith(at[:10])
    if name == "genoa":
        assert (claims["x-ms-sevsnpvm-bootloader-svn"], claims["x-ms-sevsnpvm-snpfw-svn"]) == (10, 25)
        assert claims["x-ms-sevsnpvm-microcode-svn"] == 84
        assert claims["x-ms-sevsnpvm-is-debuggable"] is False
    else:
        assert claims["x-ms-sevsnpvm-is-debuggable"] is True


@pytest.mark.parametrize(
    ("at", "match"), [("2025-08-01T00:00:00Z", "not yet valid"), ("2033-01-01T00:00:00Z", "expired")]
)
def test_real_vector_outside_validity_is_refused(
    client: httpx.Client, real: dict[str, Any], at: str, match: str
) -> None:
    ev = real["genoa"]
    data = json.loads(body(ev.raw, real_chain_pem(ev)))
    response = _post(client, json.dumps({**data, "at": at}).encode())
    assert response.status_code == 400
    assert response.json()["error"]["kind"] == "verification_failed"
    assert match in response.json()["error"]["message"]


def test_real_debug_guest_fails_a_strict_policy(client: httpx.Client, real: dict[str, Any]) -> None:
    ev = real["milan"]  # guest policy 0xB0000: DEBUG allowed
    response = _post(client, body(ev.raw, real_chain_pem(ev)))
    assert response.status_code == 403
    error = response.json()["error"]
    assert error["kind"] == "policy_violation"
    assert any("POLICY.DEBUG" in v for v in error["violations"])


# --- emulated evidence end to end -----------------------------------------------------------------------


def test_emulated_evidence_with_runtime_data(client: httpx.Client, guest: Guest) -> None:
    runtime = json.dumps({"nonce": "3f2a", "keys": []}).encode()
    report = guest.report(hashlib.sha256(runtime).digest())
    response = _post(client, body(report, guest.chain_pem(), runtime, data_type="JSON", nonce="n-1"))
    claims = _claims(client, response)
    assert claims["x-cvmotion-platform"] == "emulated"
    assert claims["x-ms-runtime"] == {"nonce": "3f2a", "keys": []}
    assert claims["nonce"] == "n-1"
    assert claims["x-ms-sevsnpvm-reportdata"] == (hashlib.sha256(runtime).digest() + bytes(32)).hex()
    assert claims["x-ms-sevsnpvm-hostdata"] == "5a" * 32
    assert claims["x-ms-sevsnpvm-chipid"] == guest.sp.get_id().hex()
    assert claims["exp"] - claims["iat"] == 3600
    assert "x-cvmotion-evaluation-time" not in claims
    binary = b"\x00\x01binary"
    report = guest.report(hashlib.sha256(binary).digest())
    claims = _claims(client, _post(client, body(report, guest.chain_pem(), binary), "needs-rtd"))
    assert claims["x-cvmotion-runtime-data"] == b64url_encode(binary)
    assert claims["x-cvmotion-tenant"] == "needs-rtd"


def test_openid_metadata_and_jwks(client: httpx.Client) -> None:
    meta = client.get("/.well-known/openid-configuration").json()
    assert meta["issuer"] == "http://attest.test"
    assert meta["jwks_uri"] == "http://attest.test/certs"
    assert "x-cvmotion-platform" in meta["claims_supported"]
    keys = client.get("/certs").json()["keys"]
    assert keys
    assert all(k["kty"] == "RSA" and k["alg"] == "RS256" and k["use"] == "sig" for k in keys)


def test_report_mode_issues_a_noncompliant_token(client: httpx.Client, guest: Guest) -> None:
    claims = _claims(client, _post(client, body(guest.report(b"audit"), guest.chain_pem()), "audit"))
    assert "x-ms-compliance-status" not in claims
    assert any("REPORTED_TCB" in v for v in claims["x-cvmotion-policy-violations"])


# --- bad input: 4xx, clear error, service keeps running, nothing logged as success ---------------------


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1 :]


def _cases(guest: Guest, real: dict[str, Any], debug_guest: Guest) -> list[tuple[str, Any, dict[str, Any], int, str]]:
    report = guest.report(hashlib.sha256(b"fresh").digest())
    chain = guest.chain_pem()
    good = json.loads(body(report, chain, b"fresh"))
    genoa = real["genoa"]
    json_hdr = {"Content-Type": "application/json"}
    return [
        ("malformed-json", b'{"report": ', {}, 400, "malformed_json"),
        ("not-an-object", b"[1, 2]", {}, 400, "invalid_request"),
        ("unknown-field", json.dumps({**good, "extra": 1}).encode(), {}, 400, "invalid_request"),
        (
            "wrong-content-type",
            json.dumps(good).encode(),
            {"headers": {"Content-Type": "text/plain"}},
            415,
            "unsupported_media_type",
        ),
        ("oversized", b"{" + b" " * MAX_BODY + b"}", {}, 413, "request_too_large"),
        ("oversized-chunked", iter([b" " * 40_000] * 3), {"headers": json_hdr}, 413, "request_too_large"),
        ("bad-base64", json.dumps({**good, "report": "!!!!"}).encode(), {}, 400, "invalid_base64"),
        ("truncated-report", body(report[:-1], chain, b"fresh"), {}, 400, "malformed_report"),
        ("tampered-report", body(_flip(report, 0x90), chain, b"fresh"), {}, 400, "verification_failed"),
        ("tampered-signature", body(_flip(report, 0x2A0), chain, b"fresh"), {}, 400, "verification_failed"),
        ("reserved-bytes", body(_flip(report, 0x1F0 + 0x60), chain, b"fresh"), {}, 400, "malformed_report"),
        ("other-chips-vcek", body(report, real_chain_pem(genoa), b"fresh"), {}, 400, "verification_failed"),
        (
            "garbage-pem",
            body(report, b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
            {},
            400,
            "malformed_certificate",
        ),
        ("replayed-runtime-data", body(report, chain, b"other runtime data"), {}, 400, "runtime_data_mismatch"),
        ("runtime-data-required", body(report, chain), {"tenant": "needs-rtd"}, 400, "runtime_data_required"),
        ("debug-guest-strict", body(debug_guest.report(b"d"), chain), {"tenant": "strict"}, 403, "policy_violation"),
        ("low-tcb-strict", body(report, chain, b"fresh"), {"tenant": "strict"}, 403, "policy_violation"),
        ("unknown-tenant", body(report, chain, b"fresh"), {"tenant": "nobody"}, 404, "unknown_tenant"),
        ("no-chain-no-kds", body(report, None, b"fresh"), {}, 400, "endorsement_required"),
        ("json-runtime-not-json", body(report, chain, b"fresh", data_type="JSON"), {}, 400, "invalid_runtime_data"),
    ]


def test_bad_input_is_refused_cleanly(
    client: httpx.Client, guest: Guest, real: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    debug_guest = launch(guest.sp, policy=DEBUG_POLICY)  # same chip: the chain of `guest` fits its reports
    caplog.set_level(logging.INFO, logger="cvmotion.attestation")
    for name, data, kw, status, kind in _cases(guest, real, debug_guest):
        caplog.clear()
        tenant = kw.pop("tenant", None)
        response = _post(client, data, tenant, **kw)
        assert response.status_code == status, (name, response.text)
        error = response.json()["error"]
        assert error["kind"] == kind, (name, error)
        assert error["message"], name
        assert not [r for r in caplog.records if "issued" in r.getMessage()], name
        assert any("refused" in r.getMessage() for r in caplog.records), name
    # still serving
    report = guest.report(hashlib.sha256(b"after").digest())
    assert _post(client, body(report, guest.chain_pem(), b"after")).status_code == 200


def test_evaluation_time_needs_the_allow_flag(
    emulated_vendor: Vendor, tmp_path: Path, real: dict[str, Any], clock: FakeClock
) -> None:
    service = make_service(tmp_path, emulated_trust(emulated_vendor), clock)
    with serve_app(create_app(service)) as tc:
        ev = real["genoa"]
        response = _post(tc, body(ev.raw, real_chain_pem(ev), at=datetime(2025, 9, 12, tzinfo=UTC)))
        assert response.status_code == 400
        assert response.json()["error"]["kind"] == "evaluation_time_not_allowed"
        assert tc.get("/nowhere").json()["error"]["kind"] == "not_found"
        assert tc.get("/attest/SevSnpVm").json()["error"]["kind"] == "method_not_allowed"


def test_untrusted_emulated_ark(real: dict[str, Any], guest: Guest, tmp_path: Path, clock: FakeClock) -> None:
    from cvmotion.attestation.trust import TrustStore

    service = make_service(tmp_path, TrustStore.amd(), clock)  # AMD's pins only: emulated chains lead nowhere
    with serve_app(create_app(service)) as tc:
        response = _post(tc, body(guest.report(b"x"), guest.chain_pem()))
        assert response.status_code == 400
        assert "is not a trusted root" in response.json()["error"]["message"]
    assert Product.GENOA.value in response.json()["error"]["message"]
