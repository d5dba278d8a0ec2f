"""cli layer: ``cvmotion attest verify`` — verify an SEV-SNP report offline, then check a policy; and
``cvmotion attest token`` — send the same evidence to an attestation service and print the token.

Contract (scripts depend on it)::

    cvmotion attest verify --report FILE --vcek FILE --chain FILE [--chain FILE ...] [--at ISO8601]
                           [--policy FILE] [--json] [--trust-anchor FILE ...] [--product NAME]

    cvmotion attest token --report FILE --vcek FILE --chain FILE [--chain FILE ...] --service URL [--at ISO8601]
                          [--tenant NAME] [--runtime-data FILE [--runtime-data-type Binary|JSON]] [--nonce N] [--json]

Exit codes (verify): 0 valid; 2 signature/chain/binding verification failed; 5 only the policy failed; 1 unreadable
or malformed input (missing file, not PEM/DER, bad report bytes, bad policy, bad option).  ``--json``
prints exactly one JSON object on stdout in every case, with ``valid`` false and ``errors`` filled on
failure.  Emulated trust anchors come from ``--trust-anchor`` and ``$CVMOTION_TRUST_ANCHORS``
(``os.pathsep``-separated PEM paths); AMD's ARKs are always trusted.  ``token`` exits 0 issued, 2 evidence
rejected, 5 policy violated, 1 bad input, 3 service failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cvmotion.errors import AbiError, CvmError, MalformedStructure, UsageError, VerificationError

if TYPE_CHECKING:
    from cryptography import x509

    from cvmotion.abi.snp import AttestationReport, Product
    from cvmotion.attestation.verify import VerifiedReport

__all__ = ["TRUST_ANCHORS_ENV", "register"]

TRUST_ANCHORS_ENV = "CVMOTION_TRUST_ANCHORS"
_MAX_INPUT = 1 << 20  # a report is 0x4A0 bytes and a chain a few KiB; refuse to slurp anything huge


def register(subparsers: Any) -> None:
    attest = subparsers.add_parser("attest", help="verify SEV-SNP attestation evidence")
    verbs = attest.add_subparsers(dest="attest_verb", metavar="VERB")
    verify = verbs.add_parser(
        "verify",
        help="verify a report's signature, VCEK/VLEK chain and bindings, then an optional policy",
        description="Exit 0 valid, 2 verification failed, 5 policy failed, 1 unreadable or malformed input.",
    )
    verify.add_argument("--report", required=True, type=Path, help="attestation report (0x4A0 bytes)")
    verify.add_argument("--vcek", required=True, type=Path, help="VCEK or VLEK certificate (DER or PEM)")
    verify.add_argument(
        "--chain", required=True, action="append", type=Path, help="PEM with ASK/ASVK and/or ARK (repeatable)"
    )
    verify.add_argument("--at", help="verification time, ISO 8601 (default: now, UTC)")
    verify.add_argument("--policy", type=Path, help="attestation policy JSON")
    verify.add_argument("--json", action="store_true", help="print one JSON object")
    verify.add_argument(
        "--trust-anchor",
        action="append",
        default=[],
        type=Path,
        help=f"emulated ARK PEM to trust (repeatable; also ${TRUST_ANCHORS_ENV})",
    )
    verify.add_argument("--product", help="expected product (Milan, Genoa, Turin)")
    verify.set_defaults(handler=_verify_command)
    _register_token(verbs)
    attest.set_defaults(handler=lambda _args: _usage(attest))


def _register_token(verbs: Any) -> None:
    token = verbs.add_parser(
        "token",
        help="send evidence to an attestation service and print the token and its claims",
        description="Exit 0 token issued, 2 evidence rejected, 5 policy violated, 1 bad input, 3 service failure.",
    )
    token.add_argument("--report", required=True, type=Path, help="attestation report (0x4A0 bytes)")
    token.add_argument("--vcek", required=True, type=Path, help="VCEK or VLEK certificate (DER or PEM)")
    token.add_argument("--chain", required=True, action="append", type=Path, help="PEM with ASK and ARK (repeatable)")
    token.add_argument("--service", required=True, help="attestation service URL, e.g. http://127.0.0.1:8790")
    token.add_argument("--tenant", help="tenant name (default: the service's default tenant)")
    token.add_argument("--at", help="evaluation time, ISO 8601 (the service must allow it)")
    token.add_argument("--runtime-data", type=Path, help="runtime data file bound by REPORT_DATA (SHA-256)")
    token.add_argument("--runtime-data-type", choices=("Binary", "JSON"), default="Binary")
    token.add_argument("--nonce", help="echoed in the token's nonce claim")
    token.add_argument("--json", action="store_true", help="print one JSON object")
    token.set_defaults(handler=_token_command)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 1


def _read(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_INPUT + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > _MAX_INPUT:
        raise MalformedStructure(f"{what} {path}: larger than {_MAX_INPUT} bytes")
    return data


def _parse_at(text: str | None) -> datetime:
    if text is None:
        return datetime.now(UTC)
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(f"--at {text!r} is not an ISO 8601 time (e.g. 2025-09-12T00:00:00Z)") from None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at  # a time without offset means UTC


@dataclass
class _Outcome:
    code: int = 0
    errors: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    report: AttestationReport | None = None
    product_hint: Product | None = None
    verified: VerifiedReport | None = None
    at: datetime | None = None


def _run(args: argparse.Namespace, out: _Outcome) -> None:
    from cvmotion.abi.snp import AttestationReport, Product
    from cvmotion.attestation.evidence import load_certificate, load_certificates
    from cvmotion.attestation.policy import load_policy
    from cvmotion.attestation.trust import TrustStore
    from cvmotion.attestation.validate import validate
    from cvmotion.attestation.verify import VerifyOptions, verify_report

    # Inputs first: anything unreadable or malformed is exit 1, whatever verification would say.
    raw = _read(args.report, "--report")
    out.report = report = AttestationReport.from_bytes(raw)
    out.product_hint = report.cpuid_product
    vcek = load_certificate(_read(args.vcek, "--vcek"), what=f"--vcek {args.vcek}")
    chain = [c for path in args.chain for c in load_certificates(_read(path, "--chain"), what=f"--chain {path}")]
    anchors = list(args.trust_anchor)
    anchors += [Path(p) for p in os.environ.get(TRUST_ANCHORS_ENV, "").split(os.pathsep) if p.strip()]
    trust = TrustStore.amd()
    for path in anchors:
        trust = trust.with_anchors_from_pem(_read(path, "trust anchor"))
    out.at = at = _parse_at(args.at)
    pin = None
    if args.product is not None:
        try:
            pin = Product.from_name(args.product)
        except AbiError as exc:
            raise UsageError(f"--product: {exc}") from None
    policy = load_policy(args.policy) if args.policy is not None else None
    out.product_hint = out.product_hint or _product_hint(vcek)

    out.verified = verified = verify_report(raw, vcek, chain, trust, at=at, options=VerifyOptions(product=pin))
    if policy is not None:
        out.violations = validate(verified, policy)


def _product_hint(cert: x509.Certificate) -> Product | None:
    """The (unverified) productName, only to decode TCBs for display when verification fails."""
    from cvmotion.abi.snp import Product
    from cvmotion.abi.vcek import OID_PRODUCT_NAME, parse_der_ia5string
    from cvmotion.attestation.evidence import amd_extension_values

    try:
        value = amd_extension_values(cert).get(OID_PRODUCT_NAME)
        return Product.from_name(parse_der_ia5string(value)) if value is not None else None
    except (AbiError, VerificationError):
        return None


def _verify_command(args: argparse.Namespace) -> int:
    from cvmotion.cli.main import EXIT_POLICY, EXIT_RUNTIME, exit_code_for

    out = _Outcome()
    try:
        _run(args, out)
    except CvmError as exc:
        out.code, out.errors = exit_code_for(exc), [str(exc)]
    except Exception as exc:  # the contract: never a traceback, never "valid"
        out.code, out.errors = EXIT_RUNTIME, [f"internal error: {type(exc).__name__}: {exc}"]
    if out.code == 0 and out.violations:
        out.code, out.errors = EXIT_POLICY, list(out.violations)
    if args.json:
        print(json.dumps(_to_json(out), indent=2))
    else:
        _print_human(out)
    return out.code


def _tcb_json(raw: int, product: Product | None) -> dict[str, Any]:
    from cvmotion.abi.snp import TcbLayout, TcbVersion

    value: dict[str, Any] = {"raw": f"{raw:#018x}"}
    if product is None:
        return value
    try:
        tcb = TcbVersion.from_u64(raw, product.tcb_layout)
    except AbiError:
        return value
    if product.tcb_layout is TcbLayout.TURIN:
        value["fmc"] = tcb.fmc
    value.update(boot_loader=tcb.boot_loader, tee=tcb.tee, snp=tcb.snp, microcode=tcb.microcode)
    return value


def _to_json(out: _Outcome) -> dict[str, Any]:
    from cvmotion.abi.snp import PolicyFlag

    v, r = out.verified, out.report
    product = v.product if v is not None else out.product_hint
    doc: dict[str, Any] = {
        "valid": out.code == 0,
        "product": product.value if product is not None else None,
        "version": r.version if r is not None else None,
        "signing_key": r.key_info.signing_key.name if r is not None else None,
        "platform": v.platform.value if v is not None else None,
        "errors": out.errors,
        "policy_violations": out.violations,
    }
    if out.at is not None:
        doc["verified_at"] = out.at.isoformat()
    if r is None:
        return doc
    doc.update(
        measurement=r.measurement.hex(),
        chip_id=r.chip_id.hex(),
        chip_id_masked=r.key_info.mask_chip_key,
        report_data=r.report_data.hex(),
        host_data=r.host_data.hex(),
        family_id=r.family_id.hex(),
        image_id=r.image_id.hex(),
        id_key_digest=r.id_key_digest.hex(),
        author_key_digest=r.author_key_digest.hex(),
        report_id=r.report_id.hex(),
        report_id_ma=r.report_id_ma.hex(),
        guest_svn=r.guest_svn,
        vmpl=r.vmpl,
        policy={
            "raw": f"{r.policy.to_u64():#018x}",
            "abi_major": r.policy.abi_major,
            "abi_minor": r.policy.abi_minor,
            "debug": r.policy.debug,
            "migrate_ma": r.policy.migrate_ma,
            "flags": [flag.name for flag in PolicyFlag if flag in r.policy.flags and flag.name],
        },
        platform_info=f"{int(r.platform_info):#x}",
        reported_tcb=_tcb_json(r.reported_tcb, product),
        current_tcb=_tcb_json(r.current_tcb, product),
        committed_tcb=_tcb_json(r.committed_tcb, product),
        launch_tcb=_tcb_json(r.launch_tcb, product),
        firmware={
            "current": f"{r.current_major}.{r.current_minor}.{r.current_build}",
            "committed": f"{r.committed_major}.{r.committed_minor}.{r.committed_build}",
        },
    )
    if r.version >= 3:
        doc["cpuid"] = {"family": f"{r.cpuid_fam_id:#x}", "model": f"{r.cpuid_mod_id:#x}", "stepping": r.cpuid_step}
    if v is not None:
        doc["endorsement"] = {
            "product_name": v.extensions.product_name,
            "trust_anchor": v.anchor.name,
            "not_after": v.endorsement.not_valid_after_utc.isoformat(),
        }
        if v.extensions.csp_id is not None:
            doc["endorsement"]["csp_id"] = v.extensions.csp_id
    return doc


def _print_human(out: _Outcome) -> None:
    from rich.console import Console
    from rich.table import Table

    doc = _to_json(out)
    if out.code != 0:
        err = Console(stderr=True, highlight=False, soft_wrap=True)
        heading = {1: "invalid input", 2: "verification failed", 5: "policy violated"}.get(out.code, "error")
        err.print(f"cvmotion: {heading}:", markup=False)
        for line in out.errors:
            err.print(f"  - {line}", markup=False)
        return
    console = Console(highlight=False, soft_wrap=True)
    table = Table(title=f"VALID — SEV-SNP report verified ({doc['platform']} platform)", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    tcb = doc["reported_tcb"]
    rows = [
        ("product", f"{doc['product']} (report v{doc['version']}, signed by {doc['signing_key']})"),
        ("platform", doc["platform"]),
        ("trust anchor", doc["endorsement"]["trust_anchor"]),
        ("measurement", doc["measurement"]),
        ("reported TCB", " ".join(f"{k}={tcb[k]}" for k in tcb if k != "raw") + f" ({tcb['raw']})"),
        ("chip_id", "(masked)" if doc["chip_id_masked"] else doc["chip_id"]),
        ("report_data", doc["report_data"]),
        ("host_data", doc["host_data"]),
        (
            "guest policy",
            f"{doc['policy']['raw']} debug={doc['policy']['debug']} migrate_ma={doc['policy']['migrate_ma']}",
        ),
        ("vmpl", str(doc["vmpl"])),
        ("firmware", doc["firmware"]["current"]),
        ("verified at", doc.get("verified_at", "")),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)


def _token_command(args: argparse.Namespace) -> int:
    """``attest token``: the evidence files -> the service -> the token and its (as issued) claims."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from cvmotion.attestation.client import AttestationClient
    from cvmotion.attestation.evidence import load_certificate, load_certificates
    from cvmotion.attestation.token import decode_unverified
    from cvmotion.cli.main import EXIT_RUNTIME, exit_code_for

    try:
        report = _read(args.report, "--report")
        vcek = load_certificate(_read(args.vcek, "--vcek"), what=f"--vcek {args.vcek}")
        chain = [c for path in args.chain for c in load_certificates(_read(path, "--chain"), what=f"--chain {path}")]
        pem = b"".join(c.public_bytes(Encoding.PEM) for c in (vcek, *chain))
        runtime = _read(args.runtime_data, "--runtime-data") if args.runtime_data is not None else None
        at = _parse_at(args.at) if args.at is not None else None
        with AttestationClient(args.service, tenant=args.tenant) as client:
            token = client.attest(report, pem, runtime, data_type=args.runtime_data_type, nonce=args.nonce, at=at)
        header, claims = decode_unverified(token)
    except CvmError as exc:
        code = exit_code_for(exc)
        if args.json:
            print(json.dumps({"token": None, "error": str(exc)}, indent=2))
        else:
            print(f"cvmotion: attestation refused: {exc}", file=sys.stderr)
        return code if code != 0 else EXIT_RUNTIME
    if args.json:
        print(json.dumps({"token": token, "header": header, "claims": claims}, indent=2))
    else:
        print(token)
        print(f"# claims as issued (kid {header.get('kid')}; verify with: cvmotion attestation verify-token)")
        print(json.dumps(claims, indent=2, sort_keys=True))
    return 0
