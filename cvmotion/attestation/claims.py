"""attestation layer: MAA-style claims of a verified SEV-SNP report (the body of an attestation token).

Names follow Microsoft Azure Attestation's ``sevsnpvm`` claim set where MAA has one (``x-ms-attestation-type``,
``x-ms-compliance-status``, ``x-ms-policy-hash``, ``x-ms-runtime``, ``x-ms-sevsnpvm-*``); byte fields are
lowercase hex as MAA writes them.  Where MAA has no claim for a report field this service needs (CHIP_ID, the
raw REPORTED_TCB, the raw guest POLICY, Turin's FMC SPL) it is added under the same ``x-ms-sevsnpvm-`` prefix;
everything cvmotion-specific is ``x-cvmotion-*``:

| claim | source (SNP ABI report field) |
|---|---|
| ``x-ms-sevsnpvm-launchmeasurement`` | MEASUREMENT (48 bytes, hex) |
| ``x-ms-sevsnpvm-reportdata`` / ``-hostdata`` / ``-reportid`` | REPORT_DATA (64) / HOST_DATA (32) / REPORT_ID (32) |
| ``x-ms-sevsnpvm-chipid`` | CHIP_ID (64; zero when KEY_INFO.MASK_CHIP_KEY) |
| ``x-ms-sevsnpvm-{bootloader,tee,snpfw,microcode}-svn`` (+ ``fmc-svn`` on Turin) | REPORTED_TCB parts |
| ``x-ms-sevsnpvm-reportedtcb`` | REPORTED_TCB raw u64 as ``0x``-hex |
| ``x-ms-sevsnpvm-guestsvn`` / ``-vmpl`` | GUEST_SVN / VMPL |
| ``x-ms-sevsnpvm-is-debuggable`` / ``-migration-allowed`` / ``-smt-allowed`` | POLICY bits 19 / 18 / 16 |
| ``x-ms-sevsnpvm-guestpolicy`` | POLICY raw u64 as ``0x``-hex |
| ``x-ms-sevsnpvm-idkeydigest`` / ``-authorkeydigest`` / ``-familyId`` / ``-imageId`` | ID block fields |
| ``x-cvmotion-platform`` | ``emulated`` or ``amd-sev-snp``: which kind of trust anchor the chain ended in |
| ``x-cvmotion-product`` / ``-signing-key`` / ``-firmware`` | product, VCEK or VLEK, CURRENT firmware version |
"""

from __future__ import annotations

from typing import Any

from cvmotion.abi.snp import PolicyFlag, Product
from cvmotion.attestation.verify import VerifiedReport

__all__ = [
    "ATTESTATION_TYPE",
    "CLAIM_NAMES",
    "COMPLIANT",
    "PLATFORM_CLAIM",
    "sevsnp_claims",
]

ATTESTATION_TYPE = "sevsnpvm"
COMPLIANT = "cvmotion-compliant-cvm"  # MAA writes "azure-compliant-cvm"; ours says whose policy it was
PLATFORM_CLAIM = "x-cvmotion-platform"
_P = "x-ms-sevsnpvm-"


def sevsnp_claims(verified: VerifiedReport) -> dict[str, Any]:
    """The report-derived claims of one verified report (no registered, runtime or policy claims)."""
    r = verified.report
    tcb = verified.reported_tcb
    claims: dict[str, Any] = {
        "x-ms-ver": "1.0",
        "x-ms-attestation-type": ATTESTATION_TYPE,
        f"{_P}launchmeasurement": r.measurement.hex(),
        f"{_P}reportdata": r.report_data.hex(),
        f"{_P}hostdata": r.host_data.hex(),
        f"{_P}reportid": r.report_id.hex(),
        f"{_P}chipid": r.chip_id.hex(),
        f"{_P}guestsvn": r.guest_svn,
        f"{_P}vmpl": r.vmpl,
        f"{_P}bootloader-svn": tcb.boot_loader,
        f"{_P}tee-svn": tcb.tee,
        f"{_P}snpfw-svn": tcb.snp,
        f"{_P}microcode-svn": tcb.microcode,
        f"{_P}reportedtcb": f"{r.reported_tcb:#018x}",
        f"{_P}is-debuggable": r.policy.debug,
        f"{_P}migration-allowed": r.policy.migrate_ma,
        f"{_P}smt-allowed": bool(r.policy.flags & PolicyFlag.SMT),
        f"{_P}guestpolicy": f"{r.policy.to_u64():#018x}",
        f"{_P}idkeydigest": r.id_key_digest.hex(),
        f"{_P}authorkeydigest": r.author_key_digest.hex(),
        f"{_P}familyId": r.family_id.hex(),
        f"{_P}imageId": r.image_id.hex(),
        PLATFORM_CLAIM: verified.platform.value,
        "x-cvmotion-product": verified.product.value,
        "x-cvmotion-signing-key": verified.signing_key.name,
        "x-cvmotion-firmware": f"{r.current_major}.{r.current_minor}.{r.current_build}",
    }
    if verified.product is Product.TURIN:
        claims[f"{_P}fmc-svn"] = tcb.fmc
    return claims


# Every claim the service may put in a token (for the OpenID metadata's claims_supported).
CLAIM_NAMES = (
    "iss",
    "iat",
    "nbf",
    "exp",
    "jti",
    "aud",
    "nonce",
    "x-ms-ver",
    "x-ms-attestation-type",
    "x-ms-compliance-status",
    "x-ms-policy-hash",
    "x-ms-runtime",
    *(
        f"{_P}{name}"
        for name in (
            "launchmeasurement",
            "reportdata",
            "hostdata",
            "reportid",
            "chipid",
            "guestsvn",
            "vmpl",
            "bootloader-svn",
            "tee-svn",
            "snpfw-svn",
            "microcode-svn",
            "fmc-svn",
            "reportedtcb",
            "is-debuggable",
            "migration-allowed",
            "smt-allowed",
            "guestpolicy",
            "idkeydigest",
            "authorkeydigest",
            "familyId",
            "imageId",
        )
    ),
    PLATFORM_CLAIM,
    "x-cvmotion-product",
    "x-cvmotion-signing-key",
    "x-cvmotion-firmware",
    "x-cvmotion-tenant",
    "x-cvmotion-runtime-data",
    "x-cvmotion-evaluation-time",
    "x-cvmotion-policy-violations",
)
