"""attestation layer: the ``POST /attest/SevSnpVm`` request body — decoding, limits and the runtime-data binding.

Body (JSON; base64url fields with or without padding, like MAA's ``AttestSevSnpVmRequest``)::

    {
      "report": "<base64url of the 0x4A0-byte ATTESTATION_REPORT>",
      "vcek_cert_chain": "<base64url of PEM: VCEK (or VLEK), ASK (or ASVK), ARK>",   optional: KDS fetch
      "runtime_data": {"data": "<base64url>", "dataType": "Binary" | "JSON"},       optional (alias runtimeData)
      "nonce": "<opaque, echoed as the token's nonce claim>",                         optional, <= 1024 chars
      "product": "Milan" | "Genoa" | "Turin",         optional: which KDS product for a v2 report (no CPUID)
      "at": "<ISO 8601 evaluation time>"              optional; only if the service allows evaluation times
    }

**Runtime-data binding (MAA's convention).**  ``REPORT_DATA[0:32] = SHA-256(runtime_data.data)`` and
``REPORT_DATA[32:64]`` all zero.  The bytes hashed are the decoded ``data`` exactly as sent (for ``JSON``
the UTF-8 JSON text, not a re-serialisation).  This is how a guest binds a fresh nonce or a public key to its
report; a report replayed with other runtime data fails with ``runtime_data_mismatch``.  The check runs
only after the report's signature verified (its REPORT_DATA is not trusted before).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from cryptography import x509
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from cvmotion.abi.snp import REPORT_SIZE, AttestationReport, Product
from cvmotion.attestation.evidence import common_name, load_certificates
from cvmotion.attestation.jwks import b64url_decode, b64url_encode
from cvmotion.attestation.service_error import ServiceError
from cvmotion.errors import AbiError
from cvmotion.ipc.validation import describe_problems

__all__ = [
    "EVIDENCE_EXAMPLE",
    "MAX_BODY",
    "MAX_RUNTIME_DATA",
    "CertificateCache",
    "DecodedEvidence",
    "EvidenceRequest",
    "ServiceError",
    "check_runtime_binding",
    "parse_evidence",
]

MAX_BODY = 64 * 1024
MAX_RUNTIME_DATA = 16 * 1024
_MAX_CHAIN_PEM = 32 * 1024


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


def _b64url_schema(size: int, what: str, *, exact: bool = False) -> dict[str, Any]:
    """The documented shape of a base64url field of ``size`` bytes (``exact``: exactly, else at most).

    Documentation only: ``b64url_decode`` and the parsers behind it enforce it, each with its own error kind.
    """
    unpadded = (size * 4 + 2) // 3
    padded = 4 * ((size + 2) // 3)
    doc: dict[str, Any] = {"description": f"base64url (padding optional) of {what}", "maxLength": padded}
    if exact:
        doc.update(minLength=unpadded, pattern=f"^[A-Za-z0-9_-]{{{unpadded}}}={{0,{padded - unpadded}}}$")
    else:
        doc["pattern"] = "^[A-Za-z0-9_-]*={0,2}$"
    return doc


class RuntimeDataModel(_Model):
    data: str = Field(
        max_length=(MAX_RUNTIME_DATA * 4) // 3 + 4,
        json_schema_extra=_b64url_schema(MAX_RUNTIME_DATA, "the runtime data; SHA-256 of it is REPORT_DATA[0:32]"),
    )
    data_type: Literal["Binary", "JSON"] = Field(
        "Binary",
        validation_alias=AliasChoices("dataType", "data_type"),
        description="JSON: data is a UTF-8 JSON object, echoed in the token as x-ms-runtime",
    )


class EvidenceRequest(_Model):
    """The body of ``POST /attest/SevSnpVm`` (unknown members are refused)."""

    report: str = Field(
        max_length=(REPORT_SIZE * 4) // 3 + 4,
        json_schema_extra=_b64url_schema(REPORT_SIZE, "the 0x4A0-byte ATTESTATION_REPORT", exact=True),
    )
    vcek_cert_chain: str | None = Field(
        None,
        max_length=(_MAX_CHAIN_PEM * 4) // 3 + 4,
        validation_alias=AliasChoices("vcek_cert_chain", "vcekCertChain"),
        json_schema_extra=_b64url_schema(_MAX_CHAIN_PEM, "PEM: VCEK (or VLEK), ASK (or ASVK), ARK; absent: the KDS"),
    )
    runtime_data: RuntimeDataModel | None = Field(None, validation_alias=AliasChoices("runtime_data", "runtimeData"))
    nonce: str | None = Field(None, max_length=1024, description="opaque, echoed as the token's nonce claim")
    product: str | None = Field(
        None,
        max_length=16,
        description="which KDS product a v2 report (no CPUID) is for",
        json_schema_extra={"enum": [p.value for p in Product] + [None]},
    )
    at: str | None = Field(
        None,
        max_length=64,
        description="evaluation time (certificate validity); only with --allow-evaluation-time",
        json_schema_extra={"format": "date-time"},
    )


def _example_report() -> str:
    """An unsigned version-5 report (policy: reserved bit 17 set): the shape of the real thing, never verified."""
    head = (5).to_bytes(4, "little") + bytes(4) + (0x30000).to_bytes(8, "little")  # VERSION, GUEST_SVN, POLICY
    return b64url_encode(head + bytes(REPORT_SIZE - len(head)))


EVIDENCE_EXAMPLE: dict[str, Any] = {
    "report": _example_report(),
    "runtime_data": {"data": b64url_encode(b'{"nonce":"n-1"}'), "dataType": "JSON"},
    "nonce": "n-1",
}


@dataclass(frozen=True, slots=True)
class DecodedEvidence:
    """A request body decoded and size-checked; the report is parsed but *unverified*."""

    raw_report: bytes
    unverified_report: AttestationReport
    endorsement: x509.Certificate | None
    chain: tuple[x509.Certificate, ...]
    runtime_data: bytes | None
    runtime_type: Literal["Binary", "JSON"]
    runtime_json: Any
    nonce: str | None
    product: Product | None
    at: datetime | None


class CertificateCache:
    """LRU of decoded, parsed and split ``vcek_cert_chain`` values, keyed by the base64url text as sent.

    Returning the *same* certificate objects for the same chain is what lets ``ChainCache`` hit by identity,
    so a chain's three RSA-4096 signatures are verified once, not on every request; keying by the text
    also skips the base64 and PEM decoding.  Only successfully parsed chains are cached.  Thread-safe.
    """

    def __init__(self, maxsize: int = 512) -> None:
        self.maxsize = maxsize
        self._entries: OrderedDict[str, tuple[x509.Certificate, tuple[x509.Certificate, ...]]] = OrderedDict()
        self._lock = threading.Lock()

    def load(self, text: str) -> tuple[x509.Certificate, tuple[x509.Certificate, ...]]:
        """(endorsement, rest of the chain) from a base64url PEM ``vcek_cert_chain``.

        Raises:
            ServiceError: 400 ``invalid_base64`` or ``malformed_certificate``.
        """
        with self._lock:
            found = self._entries.get(text)
            if found is not None:
                self._entries.move_to_end(text)
                return found
        try:
            pem = b64url_decode(text, what="vcek_cert_chain", max_len=_MAX_CHAIN_PEM)
        except AbiError as exc:
            raise _bad("invalid_base64", str(exc)) from None
        try:
            certs = tuple(load_certificates(pem, what="vcek_cert_chain"))
        except AbiError as exc:
            raise _bad("malformed_certificate", str(exc)) from None
        split = _split_chain(certs)
        with self._lock:
            self._entries[text] = split
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        return split


def _bad(kind: str, message: str) -> ServiceError:
    return ServiceError(400, kind, message)


def _split_chain(certs: tuple[x509.Certificate, ...]) -> tuple[x509.Certificate, tuple[x509.Certificate, ...]]:
    """The VCEK/VLEK (CN SEV-VCEK or SEV-VLEK) and the rest, in any order in the PEM."""
    leaves = [c for c in certs if common_name(c.subject) in ("SEV-VCEK", "SEV-VLEK")]
    if len(leaves) != 1:
        raise _bad(
            "malformed_certificate",
            f"vcek_cert_chain: expected exactly one SEV-VCEK or SEV-VLEK certificate, found {len(leaves)}",
        )
    return leaves[0], tuple(c for c in certs if c is not leaves[0])


def parse_evidence(body: bytes, certs: CertificateCache) -> DecodedEvidence:
    """Decode a request body.  Every problem is a 400 ``ServiceError`` naming the field.

    Raises:
        ServiceError: ``malformed_json``, ``invalid_request``, ``invalid_base64``, ``malformed_report``,
            ``malformed_certificate``, ``invalid_runtime_data``.
    """
    try:
        req = EvidenceRequest.model_validate_json(body)  # pydantic-core parses and validates in one pass
    except ValidationError as exc:
        errors = exc.errors()
        if errors and errors[0]["type"] == "json_invalid":
            raise _bad("malformed_json", f"request body is not JSON: {errors[0]['msg']}") from None
        if errors and errors[0]["type"] == "model_type":
            raise _bad("invalid_request", "request body must be a JSON object") from None
        problems = describe_problems(errors, root="(root)")
        raise _bad("invalid_request", problems) from None
    rtd = req.runtime_data
    try:
        raw = b64url_decode(req.report, what="report", max_len=REPORT_SIZE)
        runtime = b64url_decode(rtd.data, what="runtime_data.data", max_len=MAX_RUNTIME_DATA) if rtd else None
    except AbiError as exc:
        raise _bad("invalid_base64", str(exc)) from None
    try:
        report = AttestationReport.from_bytes(raw)
    except AbiError as exc:
        raise _bad("malformed_report", f"report: {exc}") from None
    endorsement: x509.Certificate | None = None
    chain: tuple[x509.Certificate, ...] = ()
    if req.vcek_cert_chain:
        endorsement, chain = certs.load(req.vcek_cert_chain)
    runtime_json: Any = None
    if rtd is not None and rtd.data_type == "JSON" and runtime is not None:
        try:
            runtime_json = json.loads(runtime)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _bad("invalid_runtime_data", f"runtime_data (dataType JSON) is not JSON: {exc}") from None
        if not isinstance(runtime_json, dict):
            raise _bad("invalid_runtime_data", "runtime_data (dataType JSON) must be a JSON object")
    product = None
    if req.product is not None:
        try:
            product = Product.from_name(req.product)
        except AbiError as exc:
            raise _bad("invalid_request", f"product: {exc}") from None
    at = None
    if req.at is not None:
        try:
            at = datetime.fromisoformat(req.at.strip())
        except ValueError:
            raise _bad("invalid_request", f"at: {req.at!r} is not an ISO 8601 time") from None
        at = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
    return DecodedEvidence(
        raw_report=raw,
        unverified_report=report,
        endorsement=endorsement,
        chain=chain,
        runtime_data=runtime,
        runtime_type=rtd.data_type if rtd is not None else "Binary",
        runtime_json=runtime_json,
        nonce=req.nonce,
        product=product,
        at=at,
    )


def check_runtime_binding(report_data: bytes, runtime_data: bytes) -> None:
    """MAA's binding: REPORT_DATA[0:32] = SHA-256(runtime data), REPORT_DATA[32:64] = 0.

    Raises:
        ServiceError: 400 ``runtime_data_mismatch``.
    """
    expected = hashlib.sha256(runtime_data).digest()
    if not hmac.compare_digest(report_data[:32], expected) or any(report_data[32:64]):
        raise ServiceError(
            400,
            "runtime_data_mismatch",
            "REPORT_DATA is not SHA-256(runtime_data) followed by 32 zero bytes: the report was not made for "
            "this runtime data (replayed or substituted evidence)",
        )
