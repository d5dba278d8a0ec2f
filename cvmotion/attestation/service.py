"""attestation layer: the attestation service's engine (MAA look-alike), independent of HTTP.

One request, in STYLE.md's order — bytes become a token only after parsing, signatures and policy::

    body ─► parse_evidence (JSON, base64url, sizes, report ABI, PEM)      400 malformed_* / invalid_*
         ─► tenant (404 unknown_tenant) ─► evaluation time allowed?       400 evaluation_time_not_allowed
         ─► endorsements: the request's chain, or the KDS (cached)         400 endorsement_* / 502 kds_unavailable
         ─► verify_report (signatures, chain, trusted ARK, bindings)      400 verification_failed
         ─► runtime-data binding (SHA-256 in REPORT_DATA[0:32])            400 runtime_data_mismatch / _required
         ─► validate against the tenant policy (every violation)           403 policy_violation (mode enforce)
         ─► claims ─► issue_token_at(active key, now)                      200 {"token": JWT}

The clock is injected (``clock``), so tests run on a fake clock.  ``at`` in a request sets the *evaluation*
time (certificate validity), never the token times; it is honoured only when the service was started with
``allow_evaluation_time`` (to demonstrate genuine evidence whose certificates are not valid today) and is
then written into the token as ``x-cvmotion-evaluation-time`` so no relying party mistakes it for a live
attestation.  Successes are logged at INFO ("attestation issued"), refusals at WARNING ("attestation
refused"), never the other way round.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509

from cvmotion.attestation.claims import CLAIM_NAMES, COMPLIANT, sevsnp_claims
from cvmotion.attestation.endorsements import KdsFetcher
from cvmotion.attestation.jwks import b64url_encode, jwks_document, openid_configuration
from cvmotion.attestation.keys import SigningKeyStore, utc_now
from cvmotion.attestation.request import (
    CertificateCache,
    DecodedEvidence,
    ServiceError,
    check_runtime_binding,
    parse_evidence,
)
from cvmotion.attestation.tenants import DEFAULT_TENANT, Tenant
from cvmotion.attestation.token import issue_token_at
from cvmotion.attestation.trust import TrustStore
from cvmotion.attestation.validate import validate
from cvmotion.attestation.verify import VerifiedReport, VerifyOptions, verify_report
from cvmotion.errors import AbiError, UsageError, VerificationError

__all__ = ["Attestation", "AttestationService", "ServiceError"]

log = logging.getLogger("cvmotion.attestation.service")
Clock = Callable[[], datetime]
CLOCK_SKEW = timedelta(minutes=5)  # added to the key overlap: relying parties' clocks may lag ours
_KEY_CHECK_INTERVAL = 1.0  # seconds between looks at the shared key state (rotations by other workers)


@dataclass(frozen=True, slots=True)
class Attestation:
    """The outcome of one successful attestation."""

    token: str
    claims: dict[str, Any]
    tenant: str
    verified: VerifiedReport


class AttestationService:
    """Verify → validate → token, for any number of tenants.  Thread-safe; one instance per worker process."""

    def __init__(
        self,
        *,
        trust: TrustStore,
        keys: SigningKeyStore,
        tenants: Mapping[str, Tenant],
        issuer: str,
        clock: Clock = utc_now,
        kds: KdsFetcher | None = None,
        allow_evaluation_time: bool = False,
        rotate_after: timedelta | None = None,
        verify_options: VerifyOptions | None = None,
    ) -> None:
        longest = max((timedelta(seconds=t.config.token_lifetime_s) for t in tenants.values()), default=timedelta(0))
        if longest + CLOCK_SKEW > keys.overlap:
            raise UsageError(
                f"signing-key overlap {keys.overlap} is shorter than the longest token lifetime {longest} plus "
                f"{CLOCK_SKEW} of clock skew: tokens would outlive their key in the JWKS"
            )
        if rotate_after is not None and rotate_after <= timedelta(0):
            raise UsageError("rotate_after must be positive")
        self.trust = trust
        self.keys = keys
        self.tenants = dict(tenants)
        self.issuer = issuer.rstrip("/")
        self.kds = kds
        self.allow_evaluation_time = allow_evaluation_time
        self.rotate_after = rotate_after
        self.certificates = CertificateCache()
        self._clock = clock
        self._verify_options = verify_options if verify_options is not None else VerifyOptions()
        self._next_key_check = 0.0
        self._next_clock_check = datetime.min.replace(tzinfo=UTC)

    # -- public documents --------------------------------------------------------------------------

    def jwks(self) -> dict[str, Any]:
        self._maintain_keys(self._clock())
        return jwks_document((k.kid, k.public_key) for k in self.keys.published(self._clock()))

    def openid_configuration(self) -> dict[str, Any]:
        return openid_configuration(self.issuer, CLAIM_NAMES)

    def tenant(self, name: str | None) -> Tenant:
        found = self.tenants.get(name if name is not None else DEFAULT_TENANT)
        if found is None:
            raise ServiceError(404, "unknown_tenant", f"no tenant named {name!r}")
        return found

    # -- attestation -------------------------------------------------------------------------------

    async def attest(self, body: bytes, *, tenant: str | None = None) -> Attestation:
        """Attest one ``POST /attest/SevSnpVm`` body for ``tenant`` (default tenant when None).

        Raises:
            ServiceError: any refusal, with its HTTP status and kind (nothing else escapes for bad input).
        """
        name = tenant if tenant is not None else DEFAULT_TENANT
        try:
            chosen = self.tenant(tenant)
            evidence = parse_evidence(body, self.certificates)
            if evidence.endorsement is not None:
                vcek, chain = evidence.endorsement, evidence.chain
            elif self.kds is not None:
                vcek, chain = await self.kds.endorsements(evidence.unverified_report, evidence.product)
            else:
                raise ServiceError(
                    400, "endorsement_required", "no vcek_cert_chain in the request and no KDS configured (--kds)"
                )
            result = self.attest_decoded(evidence, chosen, vcek, chain)
        except ServiceError as exc:
            log.warning("attestation refused tenant=%s status=%d kind=%s: %s", name, exc.status, exc.kind, exc)
            raise
        v = result.verified
        log.info(
            "attestation issued tenant=%s platform=%s product=%s measurement=%s jti=%s",
            name,
            v.platform.value,
            v.product.value,
            v.report.measurement.hex()[:16],
            result.claims["jti"],
        )
        return result

    def attest_decoded(
        self, evidence: DecodedEvidence, tenant: Tenant, vcek: x509.Certificate, chain: tuple[x509.Certificate, ...]
    ) -> Attestation:
        """The CPU-bound part: verify, bind, validate, sign.  Raises only ``ServiceError``."""
        now = self._clock()
        if evidence.at is not None and not self.allow_evaluation_time:
            raise ServiceError(
                400,
                "evaluation_time_not_allowed",
                "this service evaluates evidence at the current time; 'at' needs --allow-evaluation-time",
            )
        at = evidence.at if evidence.at is not None else now
        try:
            verified = verify_report(
                evidence.unverified_report, vcek, chain, self.trust, at=at, options=self._verify_options
            )
        except VerificationError as exc:
            raise ServiceError(400, "verification_failed", str(exc)) from None
        except AbiError as exc:
            raise ServiceError(400, "malformed_report", str(exc)) from None
        config = tenant.config
        if evidence.runtime_data is not None:
            check_runtime_binding(verified.report.report_data, evidence.runtime_data)
        elif config.require_runtime_data:
            raise ServiceError(400, "runtime_data_required", f"tenant {tenant.name!r} requires runtime_data")
        violations = validate(verified, config.policy)
        if violations and config.mode == "enforce":
            raise ServiceError(
                403,
                "policy_violation",
                f"evidence breaks the attestation policy of tenant {tenant.name!r}: " + "; ".join(violations),
                violations=violations,
            )
        claims = self._claims(verified, evidence, tenant, violations)
        self._maintain_keys(now)
        issued = issue_token_at(
            claims,
            self.keys.active,
            now,
            timedelta(seconds=config.token_lifetime_s),
            issuer=self.issuer,
            audience=config.audience,
        )
        return Attestation(token=issued.token, claims=issued.claims, tenant=tenant.name, verified=verified)

    def _claims(
        self, verified: VerifiedReport, evidence: DecodedEvidence, tenant: Tenant, violations: list[str]
    ) -> dict[str, Any]:
        claims = sevsnp_claims(verified)
        claims["x-ms-policy-hash"] = tenant.policy_hash
        claims["x-cvmotion-tenant"] = tenant.name
        if violations:
            claims["x-cvmotion-policy-violations"] = violations
        else:
            claims["x-ms-compliance-status"] = COMPLIANT
        if evidence.runtime_data is not None:
            if evidence.runtime_type == "JSON":
                claims["x-ms-runtime"] = evidence.runtime_json
            else:
                claims["x-cvmotion-runtime-data"] = b64url_encode(evidence.runtime_data)
        if evidence.nonce is not None:
            claims["nonce"] = evidence.nonce
        if evidence.at is not None:
            claims["x-cvmotion-evaluation-time"] = evidence.at.isoformat()
        return claims

    def _maintain_keys(self, now: datetime) -> None:
        """Pick up rotations by other processes; rotate when the active key is too old; drop expired keys."""
        # Throttled on both clocks: the monotonic one in production, the injected one when a test jumps it.
        tick = time.monotonic()
        if tick < self._next_key_check and now < self._next_clock_check:
            return
        self._next_key_check = tick + _KEY_CHECK_INTERVAL
        self._next_clock_check = now + timedelta(seconds=_KEY_CHECK_INTERVAL)
        self.keys.refresh()
        if self.rotate_after is not None and self.keys.rotate_if_older_than(self.rotate_after, now) is not None:
            log.info("token signing key rotated: new kid %s", self.keys.active.kid)
        self.keys.prune(now)
