"""agent layer: RA-TLS certificates — an ephemeral TLS key whose certificate carries the MA's attestation evidence.

Each MA, per session, makes an ephemeral ECDSA P-384 key and a self-signed X.509 v3 certificate (ECDSA
SHA-384) with two non-critical extensions under cvmotion's arc (``cvmotion.agent.oids``):

* ``arc.1`` — the SNP attestation report the MA obtained through its guest channel, with
  ``REPORT_DATA = SHA-384(DER SubjectPublicKeyInfo of the certificate's key) || 16 zero bytes``;
* ``arc.2`` — the report's endorsements, PEM: the VCEK (or VLEK) certificate, then ASK (ASVK) and ARK.

``verify_ratls_certificate`` checks, in order (every failure is a ``VerificationError`` naming the rule)::

    size / DER / X.509 v3 ─► ECDSA P-384 key, ecdsa-with-SHA384, self-signed, valid at ``at``
      ─► no unknown critical extension; report and endorsement extensions present, well formed
      ─► attestation.verify_report(report, VCEK, chain, trust, at)   (chain to a trusted ARK, signature,
         TCB and chip bindings)
      ─► REPORT_DATA binds this certificate's key (else: a stale or transplanted report)

This proves "a genuine secure processor vouches that an MA with measurement M generated this key"; that
the peer *holds* the key is proven by the TLS 1.3 handshake that pins this certificate (``tls.py``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cvmotion.abi.snp import REPORT_SIZE
from cvmotion.agent.identity import MigrationAgentIdentity
from cvmotion.agent.oids import OID_RATLS_ENDORSEMENTS, OID_RATLS_REPORT, decode_octets, encode_octets
from cvmotion.attestation.evidence import check_validity, load_certificates
from cvmotion.attestation.trust import TrustStore
from cvmotion.attestation.verify import VerifiedReport, VerifyOptions, verify_report
from cvmotion.errors import AbiError, VerificationError

__all__ = [
    "MAX_CERTIFICATE",
    "CERT_LIFETIME",
    "PeerEvidence",
    "RatlsCredential",
    "issue_ratls_certificate",
    "report_data_for",
    "verify_ratls_certificate",
]

MAX_CERTIFICATE = 32 * 1024
CERT_LIFETIME = dt.timedelta(hours=1)  # one session; clock skew between hosts is covered by BACKDATE
BACKDATE = dt.timedelta(minutes=10)
_MAX_ENDORSEMENTS = 8 * 1024
_ALLOWED_CRITICAL = {x509.oid.ExtensionOID.BASIC_CONSTRAINTS, x509.oid.ExtensionOID.KEY_USAGE}
_SUBJECT = x509.Name(
    [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cvmotion"),
        x509.NameAttribute(NameOID.COMMON_NAME, "cvmotion migration agent (RA-TLS)"),
    ]
)


def _spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def report_data_for(key: ec.EllipticCurvePublicKey) -> bytes:
    """REPORT_DATA that binds ``key``: SHA-384 of its DER SubjectPublicKeyInfo, then 16 zero bytes."""
    return hashlib.sha384(_spki(key)).digest() + bytes(16)


@dataclass(frozen=True, slots=True)
class RatlsCredential:
    """This MA's per-session TLS identity: the ephemeral key (never leaves the MA) and its RA-TLS certificate."""

    key: ec.EllipticCurvePrivateKey = field(repr=False)
    certificate: x509.Certificate
    der: bytes
    report: bytes

    def pem_bundle(self) -> bytes:
        """Certificate and unencrypted PKCS#8 key, PEM: only for handing to OpenSSL in memory (``tls.py``)."""
        key = self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return self.certificate.public_bytes(serialization.Encoding.PEM) + key


def issue_ratls_certificate(identity: MigrationAgentIdentity, *, now: dt.datetime) -> RatlsCredential:
    """A fresh P-384 key, a report binding it (through ``identity``'s guest channel) and the certificate."""
    key = ec.generate_private_key(ec.SECP384R1())
    report, endorsements = identity.attestation_report(report_data_for(key.public_key()))
    builder = (
        x509.CertificateBuilder()
        .subject_name(_SUBJECT)
        .issuer_name(_SUBJECT)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CERT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )  # digitalSignature only: it signs TLS 1.3 CertificateVerify, nothing else
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.UnrecognizedExtension(OID_RATLS_REPORT, encode_octets(report)), critical=False)
        .add_extension(x509.UnrecognizedExtension(OID_RATLS_ENDORSEMENTS, encode_octets(endorsements)), critical=False)
    )
    cert = builder.sign(key, hashes.SHA384())
    return RatlsCredential(key, cert, cert.public_bytes(serialization.Encoding.DER), report)


@dataclass(frozen=True, slots=True)
class PeerEvidence:
    """A peer's RA-TLS certificate whose evidence verified and whose report binds its key."""

    certificate: x509.Certificate
    der: bytes
    verified: VerifiedReport

    @property
    def measurement(self) -> bytes:
        """The peer MA's launch digest."""
        return self.verified.report.measurement

    @property
    def chip_id(self) -> bytes:
        return self.verified.report.chip_id


def _extension_bytes(cert: x509.Certificate, oid: x509.ObjectIdentifier, what: str, limit: int) -> bytes:
    try:
        ext = cert.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        raise VerificationError(f"RA-TLS certificate lacks the {what} extension ({oid.dotted_string})") from None
    if ext.critical or not isinstance(ext.value, x509.UnrecognizedExtension):
        raise VerificationError(f"RA-TLS {what} extension must be a non-critical opaque extension")
    try:
        data = decode_octets(ext.value.value, f"RA-TLS {what} extension")
    except ValueError as exc:
        raise VerificationError(str(exc)) from None
    if len(data) > limit:
        raise VerificationError(f"RA-TLS {what} extension is {len(data):#x} bytes, above {limit:#x}")
    return data


def _check_certificate(cert: x509.Certificate, at: dt.datetime) -> ec.EllipticCurvePublicKey:
    if cert.version is not x509.Version.v3:
        raise VerificationError("RA-TLS certificate is not X.509 v3")
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise VerificationError("RA-TLS certificate key is not ECDSA P-384")
    algorithm = cert.signature_hash_algorithm
    if cert.signature_algorithm_oid != x509.SignatureAlgorithmOID.ECDSA_WITH_SHA384 or not isinstance(
        algorithm, hashes.SHA384
    ):
        raise VerificationError("RA-TLS certificate is not signed with ecdsa-with-SHA384")
    if cert.issuer != cert.subject:
        raise VerificationError("RA-TLS certificate is not self-issued")
    try:
        cert.verify_directly_issued_by(cert)
    except (InvalidSignature, ValueError, TypeError):
        raise VerificationError("RA-TLS certificate self-signature does not verify") from None
    check_validity(cert, "RA-TLS", at)
    for ext in cert.extensions:
        if ext.critical and ext.oid not in _ALLOWED_CRITICAL:
            raise VerificationError(f"RA-TLS certificate has an unknown critical extension {ext.oid.dotted_string}")
    return key


def verify_ratls_certificate(
    der: bytes, trust: TrustStore, *, at: dt.datetime, options: VerifyOptions | None = None
) -> PeerEvidence:
    """Verify a peer's RA-TLS certificate (module docstring); returns its verified evidence.

    Raises:
        VerificationError: any rule failed; the message names it.
    """
    if not 0 < len(der) <= MAX_CERTIFICATE:
        raise VerificationError(f"RA-TLS certificate of {len(der):#x} bytes is outside 1..{MAX_CERTIFICATE:#x}")
    try:
        cert = x509.load_der_x509_certificate(der)
        if cert.public_bytes(serialization.Encoding.DER) != der:
            raise ValueError("not DER (re-encoding differs)")
        key = _check_certificate(cert, at)
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise VerificationError(f"RA-TLS certificate does not parse: {exc}") from None
    report = _extension_bytes(cert, OID_RATLS_REPORT, "attestation report", REPORT_SIZE)
    if len(report) != REPORT_SIZE:
        raise VerificationError(f"RA-TLS report is {len(report):#x} bytes, not {REPORT_SIZE:#x}")
    pem = _extension_bytes(cert, OID_RATLS_ENDORSEMENTS, "endorsements", _MAX_ENDORSEMENTS)
    try:
        certs = load_certificates(pem, what="RA-TLS endorsements")
        if len(certs) > 3:
            raise VerificationError(f"RA-TLS endorsements hold {len(certs)} certificates; at most 3 (VCEK, ASK, ARK)")
        verified = verify_report(report, certs[0], certs[1:], trust, at=at, options=options)
    except AbiError as exc:
        raise VerificationError(f"RA-TLS evidence is malformed: {exc}") from None
    if verified.report.report_data != report_data_for(key):
        raise VerificationError(
            "RA-TLS REPORT_DATA does not bind the certificate's key (a stale report or one from another session)"
        )
    return PeerEvidence(cert, der, verified)
