"""firmware layer: X.509 minting for the emulated AMD key hierarchy (ARK -> ASK -> VCEK, ARK -> ASVK -> VLEK).

Shapes follow AMD's real certificates (see tests/vectors/snp and AMD pub. 57230, "VCEK Certificate and
KDS Interface Specification"): X.509 v3; every signature RSASSA-PSS with SHA-384, MGF1-SHA-384 and a
48-byte salt; subject names in AMD's attribute order OU, C, L, ST, O, CN.  Two deliberate differences:
O is "cvmotion emulated AMD-SP" (so nobody mistakes these for AMD's), and serial numbers are positive
(AMD's VCEKs carry serial 0, which RFC 5280 forbids and ``cryptography`` warns about).

| cert | CN              | issuer   | extensions (AMD's)                                           | validity |
|------|-----------------|----------|--------------------------------------------------------------|----------|
| ARK  | ARK-{product}   | self     | keyUsage keyCertSign+cRLSign, basicConstraints CA, SKI        | 25 years |
| ASK  | SEV-{product}   | ARK      | basicConstraints CA pathlen 0, keyUsage keyCertSign, SKI, AKI | 25 years |
| ASVK | SEV-VLEK-{prod} | ARK      | as ASK                                                        | 25 years |
| VCEK | SEV-VCEK        | ASK      | 1.3.6.1.4.1.3704.1.x incl. hwID                               | 7 years  |
| VLEK | SEV-VLEK        | ASVK     | 1.3.6.1.4.1.3704.1.x incl. cspId, no hwID                     | 7 years  |
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from cvmotion.abi.snp import Product, TcbVersion
from cvmotion.abi.vcek import AmdExtensions
from cvmotion.errors import UsageError

__all__ = [
    "CA_VALIDITY",
    "EMULATED_ORG",
    "ENDORSEMENT_VALIDITY",
    "PSS_SHA384",
    "BACKDATE",
    "amd_extensions_of",
    "amd_name",
    "build_ark",
    "build_intermediate",
    "build_vcek_cert",
    "build_vlek_cert",
    "product_name_for",
]

EMULATED_ORG = "cvmotion emulated AMD-SP"
PSS_SHA384 = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
CA_VALIDITY = dt.timedelta(days=25 * 365 + 6)  # AMD's ARK/ASK: 25 years
ENDORSEMENT_VALIDITY = dt.timedelta(days=7 * 365 + 2)  # AMD's VCEKs: 7 years (2025-08-07 -> 2032-08-07)
# notBefore is backdated by an hour (as public CAs do) so a verifier whose clock lags the KDS host's a
# little does not reject a certificate minted a moment ago.
BACKDATE = dt.timedelta(hours=1)


def amd_name(common_name: str) -> x509.Name:
    """A subject/issuer name in AMD's attribute order, with our organisation."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.LOCALITY_NAME, "Santa Clara"),
            x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, EMULATED_ORG),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def product_name_for(product: Product, *, vlek: bool = False) -> str:
    """productName as AMD writes it: "Milan-B0" on Milan VCEKs, the bare name on VLEKs and later parts."""
    if product is Product.MILAN and not vlek:
        return "Milan-B0"
    return product.value


def _sign(builder: x509.CertificateBuilder, issuer_key: rsa.RSAPrivateKey) -> x509.Certificate:
    return builder.sign(issuer_key, hashes.SHA384(), rsa_padding=PSS_SHA384)


def build_ark(key: rsa.RSAPrivateKey, product: Product, now: dt.datetime) -> x509.Certificate:
    """The self-signed AMD Root Key certificate of one product."""
    name = amd_name(f"ARK-{product.value}")
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(_ca_key_usage(crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )
    return _sign(builder, key)


def build_intermediate(
    ark_key: rsa.RSAPrivateKey,
    ark_cert: x509.Certificate,
    public_key: rsa.RSAPublicKey,
    common_name: str,
    now: dt.datetime,
) -> x509.Certificate:
    """The ASK ("SEV-{product}") or the ASVK ("SEV-VLEK-{product}"), signed by the ARK."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(amd_name(common_name))
        .issuer_name(ark_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(_rsa_public(ark_cert)),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(crl_sign=False), critical=True)
    )
    return _sign(builder, ark_key)


def build_vcek_cert(
    ask_key: rsa.RSAPrivateKey,
    ask_cert: x509.Certificate,
    vcek_public: ec.EllipticCurvePublicKey,
    product: Product,
    hwid: bytes,
    tcb: TcbVersion,
    now: dt.datetime,
) -> x509.Certificate:
    """A VCEK certificate: CN SEV-VCEK, AMD extensions with the SPLs of ``tcb`` and the chip's hwID."""
    extensions = AmdExtensions(
        struct_version=1 if product is Product.TURIN else 0,
        product_name=product_name_for(product),
        tcb=tcb,
        hwid=hwid,
    )
    return _endorsement(ask_key, ask_cert, vcek_public, "SEV-VCEK", extensions, product, now)


def build_vlek_cert(
    asvk_key: rsa.RSAPrivateKey,
    asvk_cert: x509.Certificate,
    vlek_public: ec.EllipticCurvePublicKey,
    product: Product,
    csp_id: str,
    tcb: TcbVersion,
    now: dt.datetime,
) -> x509.Certificate:
    """A VLEK certificate: CN SEV-VLEK, AMD extensions with the SPLs and the CSP's cspId, no hwID."""
    extensions = AmdExtensions(
        struct_version=1 if product is Product.TURIN else 0,
        product_name=product_name_for(product, vlek=True),
        tcb=tcb,
        csp_id=csp_id,
    )
    return _endorsement(asvk_key, asvk_cert, vlek_public, "SEV-VLEK", extensions, product, now)


def amd_extensions_of(cert: x509.Certificate) -> AmdExtensions:
    """Decode the AMD extensions of a VCEK/VLEK certificate (raises ``MalformedStructure`` if absent)."""
    values: dict[str, bytes] = {}
    for ext in cert.extensions:
        if isinstance(ext.value, x509.UnrecognizedExtension):
            values[ext.oid.dotted_string] = ext.value.value
    return AmdExtensions.from_extension_values(values)


def _endorsement(
    issuer_key: rsa.RSAPrivateKey,
    issuer_cert: x509.Certificate,
    public_key: ec.EllipticCurvePublicKey,
    common_name: str,
    extensions: AmdExtensions,
    product: Product,
    now: dt.datetime,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(amd_name(common_name))
        .issuer_name(issuer_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + ENDORSEMENT_VALIDITY)
    )
    # AMD's extensions are private OIDs; like AMD we add them non-critical.
    for oid, value in extensions.to_extension_values(product).items():
        builder = builder.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value),
            critical=False,
        )
    return _sign(builder, issuer_key)


def _ca_key_usage(*, crl_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _rsa_public(cert: x509.Certificate) -> rsa.RSAPublicKey:
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise UsageError(f"{cert.subject.rfc4514_string()}: the ARK must hold an RSA key")
    return key
