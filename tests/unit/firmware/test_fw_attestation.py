"""Emulated evidence through the project's verifier (cvmotion.attestation): trusted only with our ARK as anchor."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fw_helpers import launch, new_sp

from cvmotion.abi.guest_msg import ReportRsp
from cvmotion.abi.snp import Product, SigningKey, TcbVersion
from cvmotion.attestation.trust import PlatformKind, TrustStore
from cvmotion.attestation.verify import verify_report
from cvmotion.errors import VerificationError
from cvmotion.firmware.device import SecureProcessor
from cvmotion.firmware.vendor import Vendor


def _evidence(sp: SecureProcessor, key_sel: int = 0) -> tuple[bytes, x509.Certificate, list[x509.Certificate]]:
    guest = launch(sp)
    channel = guest.channel()
    rsp = ReportRsp.from_bytes(
        channel.open_response(sp.guest_request(guest.handle, channel.report_request(b"\x5a" * 64, key_sel=key_sel)))
    )
    assert rsp.status == 0
    certs = sp.get_ext_certs(SigningKey.VLEK if key_sel == 2 else SigningKey.VCEK)
    return (
        rsp.report,
        x509.load_der_x509_certificate(certs.endorsement_der),
        x509.load_pem_x509_certificates(certs.chain_pem),
    )


def _trust(vendor: Vendor, product: Product) -> TrustStore:
    return TrustStore.amd().with_anchor(vendor.roots(product).ark.cert, kind=PlatformKind.EMULATED)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@pytest.mark.parametrize(
    ("product", "version"),
    [(Product.MILAN, 3), (Product.GENOA, 5), (Product.TURIN, 5)],
    ids=["milan-v3", "genoa-v5", "turin-v5"],
)
def test_emulated_report_verifies_with_our_anchor_only(
    emulated_vendor: Vendor, tmp_path: Path, product: Product, version: int
) -> None:
    sp = new_sp(emulated_vendor, tmp_path / "h", product, report_version=version)
    report, vcek, chain = _evidence(sp)
    verified = verify_report(report, vcek, chain, _trust(emulated_vendor, product), at=_now())
    assert verified.platform is PlatformKind.EMULATED
    assert verified.product is product
    assert verified.reported_tcb == sp.platform_status().reported_tcb
    with pytest.raises(VerificationError, match="not a trusted root"):
        verify_report(report, vcek, chain, TrustStore.amd(), at=_now())


def test_vlek_report_verifies(emulated_vendor: Vendor, tmp_path: Path) -> None:
    sp = new_sp(emulated_vendor, tmp_path / "h", Product.GENOA)
    issue = emulated_vendor.issue_vlek(Product.GENOA, "csp.example", sp.platform_status().reported_tcb, sp.get_id())
    sp.vlek_load(issue.hashstick, issue.cert.public_bytes(serialization.Encoding.DER))
    report, vlek, chain = _evidence(sp, key_sel=2)
    verified = verify_report(report, vlek, chain, _trust(emulated_vendor, Product.GENOA), at=_now())
    assert verified.signing_key is SigningKey.VLEK


def test_old_vcek_does_not_endorse_a_report_after_a_tcb_update(emulated_vendor: Vendor, tmp_path: Path) -> None:
    sp = new_sp(emulated_vendor, tmp_path / "h", Product.GENOA)
    _, old_vcek, chain = _evidence(sp)
    tcb = sp.platform_status().reported_tcb
    sp.update_tcb(TcbVersion(boot_loader=tcb.boot_loader, tee=tcb.tee, snp=tcb.snp + 1, microcode=tcb.microcode))
    report, new_vcek, _ = _evidence(sp)
    trust = _trust(emulated_vendor, Product.GENOA)
    verify_report(report, new_vcek, chain, trust, at=_now())
    with pytest.raises(VerificationError):
        verify_report(report, old_vcek, chain, trust, at=_now())


def test_another_chips_vcek_is_refused(emulated_vendor: Vendor, tmp_path: Path) -> None:
    report, _, chain = _evidence(new_sp(emulated_vendor, tmp_path / "a"))
    _, other_vcek, _ = _evidence(new_sp(emulated_vendor, tmp_path / "b"))
    with pytest.raises(VerificationError):
        verify_report(report, other_vcek, chain, _trust(emulated_vendor, Product.GENOA), at=_now())
