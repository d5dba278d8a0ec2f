"""attestation layer: ``AttestationClient`` — what a paravisor, a CLI or a test uses to get a token.

```python
client = AttestationClient("http://127.0.0.1:8790", tenant="kvstore")
token = client.attest(report_bytes, chain_pem, runtime_data=b'{"keys": [...]}', data_type="JSON")
```
Refusals come back as the error classes the rest of cvmotion already maps (CLI exit codes):
``verification_failed`` / ``runtime_data_mismatch`` -> ``VerificationError`` (2), ``policy_violation`` ->
``PolicyViolation`` with every violation (5), other 4xx -> ``UsageError`` (1), transport failures and 5xx
-> ``ServiceError`` (3).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

import httpx

from cvmotion.attestation.jwks import b64url_encode
from cvmotion.attestation.keyrelease import WRAP_ALGORITHM, TransferKey
from cvmotion.attestation.service_error import ServiceError
from cvmotion.errors import PolicyViolation, UsageError, VerificationError
from cvmotion.ipc.envelope import parse_error
from cvmotion.ipc.http_client import HttpClient

__all__ = ["AttestationClient", "KeyReleaseClient", "raise_for_error"]

_VERIFICATION_KINDS = frozenset({"verification_failed", "runtime_data_mismatch"})


def raise_for_error(response: httpx.Response, what: str) -> None:
    """Turn a non-2xx answer in our error shape into the matching exception."""
    if response.is_success:
        return
    try:
        data: object = response.json()
    except ValueError:
        data = None
    info = parse_error(response.status_code, data)
    kind, message = info.kind, info.message if info.kind != "http_error" else response.text[:300]
    violations = list(info.violations) or None
    text = f"{what}: HTTP {response.status_code} {kind}: {message}"
    if kind in _VERIFICATION_KINDS:
        raise VerificationError(text)
    if kind in ("policy_violation", "release_denied") and isinstance(violations, list):
        raise PolicyViolation([str(v) for v in violations])
    if 400 <= response.status_code < 500:
        raise UsageError(text)
    raise ServiceError(response.status_code, kind, text)


class AttestationClient(HttpClient):
    """HTTP client of one attestation service (and one tenant)."""

    def __init__(
        self,
        base_url: str,
        *,
        tenant: str | None = None,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, timeout=timeout, transport=transport)
        self.tenant = tenant

    @staticmethod
    def evidence_body(
        report: bytes,
        chain_pem: bytes | None,
        runtime_data: bytes | None = None,
        *,
        data_type: Literal["Binary", "JSON"] = "Binary",
        nonce: str | None = None,
        at: datetime | None = None,
        product: str | None = None,
    ) -> dict[str, Any]:
        """The JSON request body (see ``cvmotion.attestation.request``)."""
        body: dict[str, Any] = {"report": b64url_encode(report)}
        if chain_pem is not None:
            body["vcek_cert_chain"] = b64url_encode(chain_pem)
        if runtime_data is not None:
            body["runtime_data"] = {"data": b64url_encode(runtime_data), "dataType": data_type}
        if nonce is not None:
            body["nonce"] = nonce
        if at is not None:
            body["at"] = at.isoformat()
        if product is not None:
            body["product"] = product
        return body

    def attest(
        self,
        report: bytes,
        chain_pem: bytes | None,
        runtime_data: bytes | None = None,
        *,
        data_type: Literal["Binary", "JSON"] = "Binary",
        nonce: str | None = None,
        at: datetime | None = None,
        product: str | None = None,
    ) -> str:
        """Send evidence (``chain_pem``: VCEK + ASK + ARK PEM, or None to let the service ask its KDS).

        Raises:
            VerificationError, PolicyViolation, UsageError, ServiceError: see the module docstring.
        """
        body = self.evidence_body(
            report, chain_pem, runtime_data, data_type=data_type, nonce=nonce, at=at, product=product
        )
        params = {"tenant": self.tenant} if self.tenant is not None else None
        try:
            response = self._client.post(
                "/attest/SevSnpVm",
                content=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
                params=params,
            )
        except httpx.HTTPError as exc:
            raise ServiceError(503, "unreachable", f"attestation service {self.base_url}: {exc}") from None
        raise_for_error(response, "attestation")
        try:
            token = response.json()["token"]
        except (ValueError, KeyError, TypeError):
            raise ServiceError(502, "bad_response", "attestation service answered without a token") from None
        if not isinstance(token, str):
            raise ServiceError(502, "bad_response", "attestation service answered a non-string token")
        return token

    def _get_json(self, path: str) -> dict[str, Any]:
        try:
            response = self._client.get(path)
        except httpx.HTTPError as exc:
            raise ServiceError(503, "unreachable", f"{self.base_url}{path}: {exc}") from None
        raise_for_error(response, path)
        doc = response.json()
        if not isinstance(doc, dict):
            raise ServiceError(502, "bad_response", f"{path} is not a JSON object")
        return doc

    def jwks(self) -> dict[str, Any]:
        return self._get_json("/certs")

    def openid_configuration(self) -> dict[str, Any]:
        return self._get_json("/.well-known/openid-configuration")


class KeyReleaseClient(HttpClient):
    """Guest-side client: send a token, unwrap the secret with the transfer key."""

    def release(self, name: str, token: str, transfer: TransferKey) -> bytes:
        """The secret named ``name``.  Raises ``PolicyViolation`` / ``UsageError`` / ``ServiceError`` on refusal."""
        try:
            response = self._client.post(
                f"/keys/{name}/release",
                content=json.dumps({"target": token}).encode(),
                headers={"Content-Type": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise ServiceError(503, "unreachable", f"key-release service {self.base_url}: {exc}") from None
        raise_for_error(response, f"release of {name!r}")
        doc = response.json()
        if not isinstance(doc, dict) or doc.get("alg") != WRAP_ALGORITHM or not isinstance(doc.get("value"), str):
            raise ServiceError(502, "bad_response", "key-release service answered without an RSA-OAEP-256 value")
        return transfer.unwrap(doc["value"])
