"""agent RA-TLS: certificates carry bound evidence; every way to break the binding or the evidence is refused."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from agent_harness import FakeClock, Host, make_host, trust_for
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from cvmotion.abi.snp import Product
from cvmotion.agent.oids import OID_RATLS_ENDORSEMENTS, OID_RATLS_REPORT, decode_octets, encode_octets
from cvmotion.agent.pool import PoolAuthority
from cvmotion.agent.ratls import RatlsCredential, issue_ratls_certificate, report_data_for, verify_ratls_certificate
from cvmotion.attestation.trust import PlatformKind
from cvmotion.errors import VerificationError
from cvmotion.firmware.vendor import Vendor


def _rebuild(
    base: x509.Certificate,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    *,
    report: bytes | None = None,
    drop: x509.ObjectIdentifier | None = None,
    extra: x509.ExtensionType | None = None,
    critical: bool = False,
) -> bytes:
    """A certificate like ``base`` but signed by ``key`` (for ``key``), with edited extensions."""
    b = (
        x509.CertificateBuilder()
        .subject_name(base.subject)
        .issuer_name(base.issuer)
        .public_key(key.public_key())
        .serial_number(base.serial_number)
        .not_valid_before(base.not_valid_before_utc)
        .not_valid_after(base.not_valid_after_utc)
    )
    for ext in base.extensions:
        if ext.oid == drop or isinstance(ext.value, x509.SubjectKeyIdentifier):
            continue
        value = ext.value
        if report is not None and ext.oid == OID_RATLS_REPORT:
            value = x509.UnrecognizedExtension(OID_RATLS_REPORT, encode_octets(report))
        b = b.add_extension(value, ext.critical)
    if extra is not None:
        b = b.add_extension(extra, critical)
    return b.sign(key, hashes.SHA384()).public_bytes(serialization.Encoding.DER)


@pytest.fixture
def cred(src: Host, clock: FakeClock) -> RatlsCredential:
    return issue_ratls_certificate(src.identity, now=clock())


def test_certificate_verifies_and_binds_its_key(src: Host, cred: RatlsCredential, clock: FakeClock) -> None:
    evidence = verify_ratls_certificate(cred.der, src.config.trust, at=clock())
    assert evidence.chip_id == src.chip_id
    assert evidence.measurement == src.identity.measurement
    assert evidence.verified.platform is PlatformKind.EMULATED
    assert evidence.verified.report.report_data == report_data_for(cred.key.public_key())
    ext = cred.certificate.extensions.get_extension_for_oid(OID_RATLS_REPORT)
    assert not ext.critical
    assert decode_octets(ext.value.value, "report") == cred.report  # type: ignore[attr-defined]
    endorsements = cred.certificate.extensions.get_extension_for_oid(OID_RATLS_ENDORSEMENTS)
    assert decode_octets(endorsements.value.value, "pem").count(b"BEGIN CERTIFICATE") == 3  # type: ignore[attr-defined]


def test_stale_report_with_a_fresh_key_is_refused(src: Host, cred: RatlsCredential, clock: FakeClock) -> None:
    """A relay's own key in a certificate carrying a genuine report of another session."""
    relay_key = ec.generate_private_key(ec.SECP384R1())
    forged = _rebuild(cred.certificate, relay_key)
    with pytest.raises(VerificationError, match="REPORT_DATA does not bind"):
        verify_ratls_certificate(forged, src.config.trust, at=clock())


def test_report_from_another_session_is_refused(src: Host, cred: RatlsCredential, clock: FakeClock) -> None:
    other = issue_ratls_certificate(src.identity, now=clock())
    forged = _rebuild(cred.certificate, cred.key, report=other.report)
    with pytest.raises(VerificationError, match="REPORT_DATA does not bind"):
        verify_ratls_certificate(forged, src.config.trust, at=clock())


def test_tampered_report_is_refused(src: Host, cred: RatlsCredential, clock: FakeClock) -> None:
    report = bytearray(cred.report)
    report[0x90] ^= 0xFF  # MEASUREMENT
    forged = _rebuild(cred.certificate, cred.key, report=bytes(report))
    with pytest.raises(VerificationError, match="signature"):
        verify_ratls_certificate(forged, src.config.trust, at=clock())


def test_non_genuine_chip_is_refused(
    rogue_vendor: Vendor, emulated_vendor: Vendor, tmp_path: Path, pool_ca: PoolAuthority, clock: FakeClock
) -> None:
    rogue = make_host(rogue_vendor, tmp_path / "rogue", pool_ca, clock)
    cred = issue_ratls_certificate(rogue.identity, now=clock())
    with pytest.raises(VerificationError, match="not a trusted root"):
        verify_ratls_certificate(cred.der, trust_for((emulated_vendor, Product.GENOA)), at=clock())


def test_expired_or_not_yet_valid_certificates_are_refused(src: Host, cred: RatlsCredential, clock: FakeClock) -> None:
    with pytest.raises(VerificationError, match="expired"):
        verify_ratls_certificate(cred.der, src.config.trust, at=clock() + dt.timedelta(hours=2))
    with pytest.raises(VerificationError, match="not yet valid"):
        verify_ratls_certificate(cred.der, src.config.trust, at=clock() - dt.timedelta(hours=1))


@pytest.mark.parametrize("oid", [OID_RATLS_REPORT, OID_RATLS_ENDORSEMENTS], ids=["report", "endorsements"])
def test_missing_evidence_extension_is_refused(
    src: Host, cred: RatlsCredential, clock: FakeClock, oid: x509.ObjectIdentifier
) -> None:
    with pytest.raises(VerificationError, match="lacks"):
        verify_ratls_certificate(_rebuild(cred.certificate, cred.key, drop=oid), src.config.trust, at=clock())


def test_unknown_critical_extension_is_refused(src: Host, cred: RatlsCredential, clock: FakeClock) -> None:
    extra = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00")
    forged = _rebuild(cred.certificate, cred.key, extra=extra, critical=True)
    with pytest.raises(VerificationError, match="unknown critical extension"):
        verify_ratls_certificate(forged, src.config.trust, at=clock())


def test_non_p384_keys_and_junk_are_refused(src: Host, cred: RatlsCredential, clock: FakeClock) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(VerificationError, match="P-384"):
        verify_ratls_certificate(_rebuild(cred.certificate, rsa_key), src.config.trust, at=clock())
    p256 = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(VerificationError, match="P-384"):
        verify_ratls_certificate(_rebuild(cred.certificate, p256), src.config.trust, at=clock())
    for junk in (b"", b"\x30\x03\x02\x01\x00", bytes(40 * 1024)):
        with pytest.raises(VerificationError):
            verify_ratls_certificate(junk, src.config.trust, at=clock())


def test_every_flipped_byte_is_refused(src: Host, cred: RatlsCredential, clock: FakeClock) -> None:
    """A flip anywhere in the certificate fails (signature, parse, evidence or binding) — never passes."""
    der = bytearray(cred.der)
    for offset in range(0, len(der), 97):
        der[offset] ^= 0x40
        with pytest.raises(VerificationError):
            verify_ratls_certificate(bytes(der), src.config.trust, at=clock())
        der[offset] ^= 0x40
