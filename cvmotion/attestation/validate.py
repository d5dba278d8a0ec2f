"""attestation layer: validate a *verified* report against an ``AttestationPolicy`` — every violation, not the first.

``validate`` never looks at signatures (``verify_report`` did); it takes a ``VerifiedReport`` so an unverified
report cannot reach it by mistake.  Each violation names the report field (spec name) and both values,
in the manner of go-sev-guest's ``validate`` package.
"""

from __future__ import annotations

from cvmotion.abi.snp import Product, TcbVersion
from cvmotion.attestation.policy import AttestationPolicy, MigrateMa, TcbMinimum
from cvmotion.attestation.verify import VerifiedReport
from cvmotion.errors import PolicyViolation

__all__ = ["require_valid", "validate"]


def _minimum_for(requirement: TcbMinimum | dict[Product, TcbMinimum], product: Product) -> TcbMinimum | None:
    if isinstance(requirement, TcbMinimum):
        return requirement
    return requirement.get(product)


def _check_tcb(
    out: list[str],
    requirement: TcbMinimum | dict[Product, TcbMinimum] | None,
    product: Product,
    fields: tuple[tuple[str, TcbVersion], ...],
    policy_field: str,
) -> None:
    if requirement is None:
        return
    minimum = _minimum_for(requirement, product)
    if minimum is None:
        out.append(f"{policy_field}: the policy has no minimum for {product.value} (fails closed)")
        return
    for name, tcb in fields:
        short = minimum.shortfalls(tcb, product)
        if short:
            out.append(f"{name} is below {policy_field}: {', '.join(short)}")


def _one_of(out: list[str], name: str, value: bytes, allowed: tuple[bytes, ...] | None) -> None:
    if allowed is not None and value not in allowed:
        out.append(f"{name} {value.hex()} is not one of the {len(allowed)} allowed value(s)")


def _equal(out: list[str], name: str, value: bytes, expected: bytes | None) -> None:
    if expected is not None and value != expected:
        out.append(f"{name} {value.hex()} does not match the expected {expected.hex()}")


def validate(verified: VerifiedReport, policy: AttestationPolicy) -> list[str]:
    """Return every way ``verified`` breaks ``policy``; an empty list means compliant."""
    r = verified.report
    out: list[str] = []
    _check_tcb(
        out,
        policy.minimum_tcb,
        verified.product,
        (
            ("CURRENT_TCB", verified.current_tcb),
            ("COMMITTED_TCB", verified.committed_tcb),
            ("REPORTED_TCB", verified.reported_tcb),
        ),
        "minimum_tcb",
    )
    _check_tcb(
        out, policy.minimum_launch_tcb, verified.product, (("LAUNCH_TCB", verified.launch_tcb),), "minimum_launch_tcb"
    )
    if r.policy.debug and not policy.allow_debug:
        out.append(f"POLICY.DEBUG is set (guest policy {r.policy.to_u64():#x}) but the policy forbids debug guests")
    if policy.migrate_ma is MigrateMa.REQUIRE and not r.policy.migrate_ma:
        out.append("POLICY.MIGRATE_MA is clear but the policy requires a migration agent")
    if policy.migrate_ma is MigrateMa.FORBID and r.policy.migrate_ma:
        out.append("POLICY.MIGRATE_MA is set but the policy forbids a migration agent")
    if policy.vmpl is not None and r.vmpl != policy.vmpl:
        out.append(f"VMPL {r.vmpl} is not the required {policy.vmpl}")
    if policy.max_vmpl is not None and r.vmpl > policy.max_vmpl:
        out.append(f"VMPL {r.vmpl} is above the maximum {policy.max_vmpl}")
    _one_of(out, "MEASUREMENT", r.measurement, policy.measurements)
    _equal(out, "REPORT_DATA", r.report_data, policy.report_data)
    _equal(out, "HOST_DATA", r.host_data, policy.host_data)
    _equal(out, "FAMILY_ID", r.family_id, policy.family_id)
    _equal(out, "IMAGE_ID", r.image_id, policy.image_id)
    _one_of(out, "ID_KEY_DIGEST", r.id_key_digest, policy.id_key_digests)
    if policy.require_id_block and not any(r.id_key_digest):
        out.append("ID_KEY_DIGEST is zero (no ID block) but the policy requires an ID block")
    if policy.require_author_key and not (r.key_info.author_key_en and any(r.author_key_digest)):
        out.append("KEY_INFO.AUTHOR_KEY_EN is clear (no author key) but the policy requires one")
    if policy.author_key_digests is not None:
        if r.key_info.author_key_en:
            _one_of(out, "AUTHOR_KEY_DIGEST", r.author_key_digest, policy.author_key_digests)
        else:
            out.append("AUTHOR_KEY_DIGEST is absent (KEY_INFO.AUTHOR_KEY_EN clear) but the policy lists allowed ones")
    if r.guest_svn < policy.minimum_guest_svn:
        out.append(f"GUEST_SVN {r.guest_svn} is below the minimum {policy.minimum_guest_svn}")
    minimum_fw = policy.minimum_firmware_tuple
    current_fw = (r.current_major, r.current_minor, r.current_build)
    if minimum_fw is not None and current_fw < minimum_fw:
        out.append(
            f"firmware {r.current_major}.{r.current_minor} build {r.current_build} (CURRENT) is below the minimum "
            f"{minimum_fw[0]}.{minimum_fw[1]} build {minimum_fw[2]}"
        )
    if policy.platforms is not None and verified.platform not in policy.platforms:
        allowed = ", ".join(p.value for p in policy.platforms)
        out.append(f"platform {verified.platform.value} is not allowed ({allowed})")
    if policy.products is not None and verified.product not in policy.products:
        allowed = ", ".join(p.value for p in policy.products)
        out.append(f"product {verified.product.value} is not allowed ({allowed})")
    if policy.chip_ids is not None:
        if r.key_info.mask_chip_key:
            out.append("CHIP_ID is masked (KEY_INFO.MASK_CHIP_KEY) but the policy allows only listed chips")
        else:
            _one_of(out, "CHIP_ID", r.chip_id, policy.chip_ids)
    if policy.signing_keys is not None and verified.signing_key.name not in policy.signing_keys:
        out.append(f"signing key {verified.signing_key.name} is not allowed ({', '.join(policy.signing_keys)})")
    return out


def require_valid(verified: VerifiedReport, policy: AttestationPolicy) -> None:
    """Raise ``PolicyViolation`` carrying every violation, or return when the report complies."""
    violations = validate(verified, policy)
    if violations:
        raise PolicyViolation(violations)
