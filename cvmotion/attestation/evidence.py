"""attestation layer: AMD endorsement certificates — loading, per-certificate rules and chain building.

The chains are the ones AMD's Key Distribution Service publishes ("Versioned Chip Endorsement Key (VCEK)
Certificate and KDS Interface Specification", AMD pub. 57230)::

    ARK-{product}  (RSA-4096, self-signed)          ARK-{product}
        └── SEV-{product}       (ASK, RSA-4096)         └── SEV-VLEK-{product}  (ASVK, RSA-4096)
              └── SEV-VCEK  (ECDSA P-384, hwID)               └── SEV-VLEK  (ECDSA P-384, cspId)

Every certificate in them is X.509 v3 signed with RSASSA-PSS, SHA-384, MGF1-SHA-384, salt length 48.  The
signature algorithm is checked on the DER encoding itself (the AlgorithmIdentifier must be one of the
encodings of exactly those parameters), not just inferred from a verification that passes.

``build_chain`` is a pure function of the certificates it is given (no clock, no trust store), so its
result can be cached; validity periods and the trust decision are checked by the caller on every use.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID

from cvmotion.abi.snp import Product, SigningKey
from cvmotion.abi.vcek import OID_FMC_SPL, AmdExtensions
from cvmotion.errors import AbiError, MalformedStructure, VerificationError

__all__ = [
    "AMD_RSA_BITS",
    "EndorsementChain",
    "amd_extension_values",
    "build_chain",
    "check_validity",
    "common_name",
    "load_certificate",
    "load_certificates",
    "spki_sha256",
    "verify_pss_signature",
]

AMD_RSA_BITS = 4096  # ARK, ASK and ASVK are RSA-4096 (pub. 57230, "Certificate Chain"); we require it
SUPPORTED_STRUCT_VERSIONS = frozenset({0, 1})  # 0: Milan/Genoa (64-byte hwID); 1: Turin (fmcSPL, 8-byte hwID)

# Genuine AMD VCEK/VLEK certificates carry serial number 0; cryptography warns about it (RFC 5280 wants a
# positive serial).  We silence exactly that warning while loading, nothing else.
_SERIAL_WARNING = r"Parsed a serial number which wasn't positive"

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


# --- DER helpers: just enough to compare AlgorithmIdentifiers byte for byte -------------------------------


def _tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    size = (n.bit_length() + 7) // 8
    return bytes([tag, 0x80 | size]) + n.to_bytes(size, "big") + body


def _read_tlv(data: bytes, offset: int) -> tuple[int, int, int]:
    """Return (tag, value_start, value_end) of the DER element at ``offset``."""
    if offset + 2 > len(data):
        raise MalformedStructure(f"certificate DER: truncated element at {offset:#x}")
    tag, first = data[offset], data[offset + 1]
    start = offset + 2
    if first & 0x80:
        n = first & 0x7F
        if n == 0 or n > 4 or start + n > len(data):
            raise MalformedStructure(f"certificate DER: bad length at {offset:#x}")
        length = int.from_bytes(data[start : start + n], "big")
        start += n
    else:
        length = first
    if start + length > len(data):
        raise MalformedStructure(f"certificate DER: element at {offset:#x} overruns the certificate")
    return tag, start, start + length


_OID_RSASSA_PSS = bytes.fromhex("06092a864886f70d01010a")  # 1.2.840.113549.1.1.10
_OID_MGF1 = bytes.fromhex("06092a864886f70d010108")  # 1.2.840.113549.1.1.8
_OID_SHA384 = bytes.fromhex("0609608648016503040202")  # 2.16.840.1.101.3.4.2.2
_NULL = bytes.fromhex("0500")


def _pss_sha384_encodings() -> frozenset[bytes]:
    """Every encoding of RSASSA-PSS-params {SHA-384, MGF1(SHA-384), salt 48, trailer 1} (RFC 4055 §3.1).

    The hash AlgorithmIdentifiers may carry NULL parameters or none, and AMD's ARK/ASK/VCEK certificates
    spell out the default trailerField [3] 1 while the Genoa VCEK omits it, so all eight spellings of the
    same parameters are accepted — and nothing else.
    """
    out = set()
    for hash_params in (_NULL, b""):
        sha384 = _tlv(0x30, _OID_SHA384 + hash_params)
        for mgf_params in (_NULL, b""):
            mgf = _tlv(0x30, _OID_MGF1 + _tlv(0x30, _OID_SHA384 + mgf_params))
            for trailer in (b"", _tlv(0xA3, _tlv(0x02, b"\x01"))):
                params = _tlv(0xA0, sha384) + _tlv(0xA1, mgf) + _tlv(0xA2, _tlv(0x02, b"\x30")) + trailer
                out.add(_tlv(0x30, _OID_RSASSA_PSS + _tlv(0x30, params)))
    return frozenset(out)


_PSS_SHA384_ALGIDS = _pss_sha384_encodings()


def _check_signature_algorithm(cert: x509.Certificate, label: str) -> None:
    """Certificate.signatureAlgorithm and TBSCertificate.signature must both be RSASSA-PSS/SHA-384/salt 48."""
    der = cert.public_bytes(serialization.Encoding.DER)
    _, cert_start, _ = _read_tlv(der, 0)
    _, tbs_start, tbs_end = _read_tlv(der, cert_start)
    _, _, alg_end = _read_tlv(der, tbs_end)
    outer = der[tbs_end:alg_end]
    # TBSCertificate ::= SEQUENCE { [0] version, serialNumber, signature AlgorithmIdentifier, ... } (RFC 5280)
    tag, _, version_end = _read_tlv(der, tbs_start)
    if tag != 0xA0:
        raise VerificationError(f"{label} certificate is not X.509 v3")
    _, _, serial_end = _read_tlv(der, version_end)
    _, _, inner_end = _read_tlv(der, serial_end)
    inner = der[serial_end:inner_end]
    if outer not in _PSS_SHA384_ALGIDS or inner != outer:
        raise VerificationError(
            f"{label} certificate signature algorithm is not RSASSA-PSS SHA-384 MGF1-SHA-384 salt 48 "
            f"({cert.signature_algorithm_oid.dotted_string})"
        )


# --- loading ----------------------------------------------------------------------------------------------


def load_certificates(data: bytes, *, what: str = "certificate") -> list[x509.Certificate]:
    """Load every certificate from PEM (one or more ``CERTIFICATE`` blocks) or a single DER certificate.

    Raises:
        MalformedStructure: the bytes are neither (CLI exit code 1).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SERIAL_WARNING, category=CryptographyDeprecationWarning)
        try:
            if b"-----BEGIN" in data:
                certs = x509.load_pem_x509_certificates(data)
            else:
                certs = [x509.load_der_x509_certificate(data)]
        except ValueError as exc:
            raise MalformedStructure(f"{what}: not a PEM or DER X.509 certificate ({exc})") from None
    if not certs:
        raise MalformedStructure(f"{what}: no certificate found")
    return certs


def load_certificate(data: bytes, *, what: str = "certificate") -> x509.Certificate:
    """Load exactly one certificate (PEM or DER)."""
    certs = load_certificates(data, what=what)
    if len(certs) != 1:
        raise MalformedStructure(f"{what}: expected one certificate, found {len(certs)}")
    return certs[0]


# --- per-certificate facts ---------------------------------------------------------------------------------


def spki_sha256(cert: x509.Certificate) -> bytes:
    """SHA-256 of the DER SubjectPublicKeyInfo: how AMD's ARKs are pinned."""
    spki = _public_key(cert, common_name(cert.subject)).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


def common_name(name: x509.Name) -> str:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = attrs[0].value if len(attrs) == 1 else ""
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _extensions(cert: x509.Certificate) -> x509.Extensions:
    """The parsed extensions; duplicates or undecodable standard extensions are a verification failure."""
    try:
        return cert.extensions
    except ValueError as exc:
        raise VerificationError(f"certificate CN={common_name(cert.subject)!r}: bad extensions ({exc})") from None


def _public_key(cert: x509.Certificate, label: str) -> CertificatePublicKeyTypes:
    try:
        return cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise VerificationError(f"{label} certificate: unsupported public key ({exc})") from None


def amd_extension_values(cert: x509.Certificate) -> dict[str, bytes]:
    """``{dotted OID: extnValue content}`` of the non-standard (AMD) extensions."""
    return {
        ext.oid.dotted_string: ext.value.value
        for ext in _extensions(cert)
        if isinstance(ext.value, x509.UnrecognizedExtension)
    }


def check_validity(cert: x509.Certificate, label: str, at: datetime) -> None:
    """Raise unless ``not_before <= at <= not_after`` (RFC 5280 §4.1.2.5: both ends inclusive)."""
    if at < cert.not_valid_before_utc:
        raise VerificationError(
            f"certificate {label} is not yet valid at {at.isoformat()} (not before {cert.not_valid_before_utc})"
        )
    if at > cert.not_valid_after_utc:
        raise VerificationError(f"certificate {label} expired at {cert.not_valid_after_utc} ({at.isoformat()})")


def verify_pss_signature(cert: x509.Certificate, issuer: x509.Certificate, label: str, issuer_label: str) -> None:
    """Check that ``issuer`` signed ``cert`` with RSASSA-PSS SHA-384 salt 48 and that the names chain."""
    if cert.issuer != issuer.subject:
        raise VerificationError(f"{label} issuer {cert.issuer.rfc4514_string()} is not {issuer_label}")
    _check_signature_algorithm(cert, label)
    key = _public_key(issuer, issuer_label)
    if not isinstance(key, rsa.RSAPublicKey):
        raise VerificationError(f"{issuer_label} key is not RSA")
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes, _PSS, hashes.SHA384())
    except InvalidSignature:
        raise VerificationError(f"{label} is not signed by {issuer_label}") from None


def _check_ca(cert: x509.Certificate, label: str) -> None:
    """ARK/ASK/ASVK must be RSA-4096 CA certificates allowed to sign certificates."""
    if cert.version is not x509.Version.v3:
        raise VerificationError(f"{label} certificate is not X.509 v3")
    key = _public_key(cert, label)
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size != AMD_RSA_BITS:
        raise VerificationError(f"{label} key is not RSA-{AMD_RSA_BITS}")
    try:
        constraints = _extensions(cert).get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise VerificationError(f"{label} certificate lacks basicConstraints (CA)") from None
    if not constraints.ca:
        raise VerificationError(f"{label} certificate is not a CA (basicConstraints CA false)")
    try:
        usage = _extensions(cert).get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not usage.key_cert_sign:
        raise VerificationError(f"{label} certificate key usage lacks keyCertSign")


_KNOWN_CRITICAL = frozenset({x509.BasicConstraints.oid, x509.KeyUsage.oid})


def _check_critical(cert: x509.Certificate, label: str) -> None:
    for ext in _extensions(cert):
        if ext.critical and ext.oid not in _KNOWN_CRITICAL:
            raise VerificationError(
                f"{label} certificate has an unsupported critical extension {ext.oid.dotted_string}"
            )


# --- the chain --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EndorsementChain:
    """A VCEK/VLEK and the intermediate and ARK that signed it; all RSA signatures verified, names chained.

    Not yet trusted: the ARK still has to match a trust anchor, and validity periods are checked per use.
    """

    signing_key: SigningKey
    endorsement: x509.Certificate
    extensions: AmdExtensions
    intermediate: x509.Certificate
    ark: x509.Certificate
    product: Product
    ark_spki_sha256: bytes

    @property
    def labelled(self) -> tuple[tuple[str, x509.Certificate], ...]:
        return (
            (self.signing_key.name, self.endorsement),
            (self.intermediate_label, self.intermediate),
            (f"ARK-{self.product.value}", self.ark),
        )

    @property
    def intermediate_label(self) -> str:
        return (
            f"ASK SEV-{self.product.value}"
            if self.signing_key is SigningKey.VCEK
            else f"ASVK SEV-VLEK-{self.product.value}"
        )


def _endorsement_extensions(cert: x509.Certificate, signing_key: SigningKey) -> tuple[AmdExtensions, Product]:
    """The VCEK/VLEK's own rules: CN, P-384 key, AMD extensions of the right kind (pub. 57230 table 8)."""
    label = signing_key.name
    expected_cn = f"SEV-{label}"
    cn = common_name(cert.subject)
    if cn != expected_cn:
        raise VerificationError(f"KEY_INFO.SIGNING_KEY is {label} but the endorsement certificate is CN={cn!r}")
    if cert.version is not x509.Version.v3:
        raise VerificationError(f"{label} certificate is not X.509 v3")
    key = _public_key(cert, label)
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise VerificationError(f"{label} key is not an ECDSA P-384 key")
    values = amd_extension_values(cert)
    try:
        ext = AmdExtensions.from_extension_values(values)
        product = ext.product
    except AbiError as exc:
        raise VerificationError(f"{label} certificate: {exc}") from None
    if ext.struct_version not in SUPPORTED_STRUCT_VERSIONS:
        raise VerificationError(f"{label} certificate structVersion {ext.struct_version} is not supported (0 or 1)")
    if signing_key is SigningKey.VCEK:
        if ext.hwid is None or ext.csp_id is not None:
            raise VerificationError("VCEK certificate must carry hwID and no cspId")
    elif ext.hwid is not None or ext.csp_id is None:
        raise VerificationError("VLEK certificate must carry cspId and no hwID")
    # fmcSPL exists on Turin (TCB_VERSION.FMC) and nowhere else; a missing one would silently compare as 0.
    if (OID_FMC_SPL in values) != (product is Product.TURIN):
        where = "lacks" if product is Product.TURIN else "carries"
        raise VerificationError(f"{label} certificate for {product.value} {where} fmcSPL ({OID_FMC_SPL})")
    return ext, product


def _product_from_cn(cn: str, prefix: str) -> Product | None:
    if not cn.startswith(prefix):
        return None
    try:
        return Product.from_name(cn[len(prefix) :])
    except AbiError:
        return None


def _find_issuer(
    cert: x509.Certificate, candidates: Iterable[x509.Certificate], label: str, issuer_label: str
) -> x509.Certificate:
    named = [c for c in candidates if c.subject == cert.issuer and c != cert]
    if not named:
        raise VerificationError(
            f"certificate chain: no {issuer_label} (CN={common_name(cert.issuer)}) to verify the {label}"
        )
    failures: list[VerificationError] = []
    for issuer in named:  # a chain may hold two certificates with one name (e.g. a re-issued ASK)
        try:
            verify_pss_signature(cert, issuer, label, issuer_label)
        except VerificationError as exc:
            failures.append(exc)
            continue
        return issuer
    raise failures[0]


def build_chain(
    endorsement: x509.Certificate, certs: Sequence[x509.Certificate], signing_key: SigningKey
) -> EndorsementChain:
    """Find the intermediate and ARK for ``endorsement`` among ``certs`` (any order) and verify all three
    RSASSA-PSS signatures, the name chaining, CA flags, key types and the product named by each certificate.

    Raises:
        VerificationError: naming the rule and the certificate that broke it.
    """
    if signing_key not in (SigningKey.VCEK, SigningKey.VLEK):
        raise VerificationError(f"KEY_INFO.SIGNING_KEY is {signing_key.name}: no endorsement key signed the report")
    ext, product = _endorsement_extensions(endorsement, signing_key)
    label = signing_key.name
    _check_critical(endorsement, label)
    prefix = "SEV-" if signing_key is SigningKey.VCEK else "SEV-VLEK-"
    issuer_cn = common_name(endorsement.issuer)
    if _product_from_cn(issuer_cn, prefix) is not product or issuer_cn != f"{prefix}{product.value}":
        raise VerificationError(
            f"product mismatch: {label} productName {ext.product_name!r} but issuer CN={issuer_cn!r} "
            f"(expected {prefix}{product.value})"
        )
    pool = [c for c in certs if c != endorsement]
    inter_label = f"{'ASK' if signing_key is SigningKey.VCEK else 'ASVK'} {issuer_cn}"
    intermediate = _find_issuer(endorsement, pool, label, inter_label)
    _check_ca(intermediate, inter_label)
    _check_critical(intermediate, inter_label)
    ark_cn = common_name(intermediate.issuer)
    if ark_cn != f"ARK-{product.value}":
        raise VerificationError(
            f"product mismatch: {inter_label} issued by CN={ark_cn!r}, expected ARK-{product.value}"
        )
    arks = [c for c in pool if c.subject == c.issuer]
    ark = _find_issuer(intermediate, arks, inter_label, f"ARK {ark_cn}")
    verify_pss_signature(ark, ark, f"ARK {ark_cn}", f"ARK {ark_cn} (self-signature)")
    _check_ca(ark, f"ARK {ark_cn}")
    _check_critical(ark, f"ARK {ark_cn}")
    return EndorsementChain(
        signing_key=signing_key,
        endorsement=endorsement,
        extensions=ext,
        intermediate=intermediate,
        ark=ark,
        product=product,
        ark_spki_sha256=spki_sha256(ark),
    )
