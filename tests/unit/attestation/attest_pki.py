"""Test-only synthetic AMD PKI: ARK/ASK/ASVK/VCEK/VLEK certificates with AMD's names and extensions, and
reports signed with our own P-384 keys.

The RSA-4096 keys are fixed (data/test_rsa4096_keys.pem, generated once for these tests, never used
anywhere else) so the tests are deterministic and pay no key generation; P-384 keys derive from integers.
The certificates deliberately use AMD's real names (O=Advanced Micro Devices): they are what a forger would
present, and the verifier must tell them apart from AMD's by key alone.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from cvmotion.abi.snp import (
    SIGNED_LEN,
    AttestationReport,
    GuestPolicy,
    KeyInfo,
    PlatformInfo,
    PolicyFlag,
    Product,
    SigningKey,
    TcbVersion,
)
from cvmotion.abi.vcek import AmdExtensions

T0 = datetime(2025, 1, 1, tzinfo=UTC)
AT = datetime(2026, 1, 1, tzinfo=UTC)  # when synthetic evidence is verified
PSS48 = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
CPUID = {Product.MILAN: (0x19, 0x01, 0x01), Product.GENOA: (0x19, 0x11, 0x01), Product.TURIN: (0x1A, 0x02, 0x00)}


@functools.cache
def rsa_keys() -> tuple[rsa.RSAPrivateKey, ...]:
    data = (Path(__file__).parent / "data" / "test_rsa4096_keys.pem").read_bytes()
    end = b"-----END PRIVATE KEY-----\n"
    keys = []
    for block in data.split(end)[:-1]:
        key = serialization.load_pem_private_key(block + end, None, unsafe_skip_rsa_key_validation=True)
        assert isinstance(key, rsa.RSAPrivateKey)
        keys.append(key)
    return tuple(keys)


def p384(seed: int) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(0x5EED_0000 + seed, ec.SECP384R1())


def amd_name(cn: str, org: str = "Advanced Micro Devices") -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.LOCALITY_NAME, "Santa Clara"),
            x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def make_cert(
    *,
    subject: x509.Name,
    issuer: x509.Name,
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
    signer: rsa.RSAPrivateKey,
    ca: bool | None,
    not_before: datetime = T0,
    not_after: datetime = T0 + timedelta(days=3650),
    amd: dict[str, bytes] | None = None,
    rsa_padding: padding.AsymmetricPadding = PSS48,
    hash_alg: hashes.HashAlgorithm | None = None,
    serial: int = 1,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    for oid, value in (amd or {}).items():
        builder = builder.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), critical=False)
    return builder.sign(signer, hash_alg or hashes.SHA384(), rsa_padding=rsa_padding)


@dataclass
class Pki:
    """One product's ARK, ASK and ASVK (keys from rsa_keys())."""

    product: Product
    org: str = "Advanced Micro Devices"
    ark_key: rsa.RSAPrivateKey | None = None
    ask_key: rsa.RSAPrivateKey = field(init=False)
    asvk_key: rsa.RSAPrivateKey = field(init=False)

    def __post_init__(self) -> None:
        # Each product gets its own ARK key (a trust store refuses one key under two products).
        i = list(Product).index(self.product)
        keys = rsa_keys()
        self.ark_key = self.ark_key or keys[i]
        self.ask_key, self.asvk_key = keys[(i + 1) % 4], keys[(i + 2) % 4]
        p = self.product.value
        self.ark = self.ca_cert(f"ARK-{p}", self.ark_key, self.ark_key, f"ARK-{p}")
        self.ask = self.ca_cert(f"SEV-{p}", self.ask_key, self.ark_key, f"ARK-{p}")
        self.asvk = self.ca_cert(f"SEV-VLEK-{p}", self.asvk_key, self.ark_key, f"ARK-{p}")

    def name(self, cn: str) -> x509.Name:
        return amd_name(cn, self.org)

    def ca_cert(self, cn: str, key: rsa.RSAPrivateKey, signer: rsa.RSAPrivateKey, issuer_cn: str, **kw: object):
        return make_cert(
            subject=self.name(cn),
            issuer=self.name(issuer_cn),
            public_key=key.public_key(),
            signer=signer,
            ca=True,
            **kw,  # type: ignore[arg-type]
        )

    def chain(self, *, vlek: bool = False) -> list[x509.Certificate]:
        return [self.asvk if vlek else self.ask, self.ark]

    def endorsement(
        self,
        key: ec.EllipticCurvePrivateKey,
        tcb: TcbVersion,
        *,
        hwid: bytes | None = None,
        csp_id: str | None = None,
        vlek: bool = False,
        product_name: str | None = None,
        struct_version: int | None = None,
        drop: tuple[str, ...] = (),
        extra: dict[str, bytes] | None = None,
        signer: rsa.RSAPrivateKey | None = None,
        issuer_cn: str | None = None,
        **kw: object,
    ) -> x509.Certificate:
        """A VCEK (default) or VLEK certificate for ``key`` with AMD's extensions for this product."""
        turin = self.product is Product.TURIN  # structVersion 1 (fmcSPL, 8-byte hwID); "Milan-B0" as on AMD VCEKs
        ext = AmdExtensions(
            struct_version=struct_version if struct_version is not None else int(turin),
            product_name=product_name
            or ("Milan-B0" if self.product is Product.MILAN and not vlek else self.product.value),
            tcb=tcb,
            hwid=hwid,
            csp_id=csp_id,
        )
        values = {k: v for k, v in ext.to_extension_values(self.product).items() if k not in drop}
        values.update(extra or {})
        p = self.product.value
        return make_cert(
            subject=self.name("SEV-VLEK" if vlek else "SEV-VCEK"),
            issuer=self.name(issuer_cn or (f"SEV-VLEK-{p}" if vlek else f"SEV-{p}")),
            public_key=key.public_key(),
            signer=signer or (self.asvk_key if vlek else self.ask_key),
            ca=None,
            amd=values,
            **kw,  # type: ignore[arg-type]
        )

    def vcek(self, key: ec.EllipticCurvePrivateKey, tcb: TcbVersion, chip_id: bytes, **kw: object) -> x509.Certificate:
        kw.setdefault("hwid", chip_id[: self.product.hwid_len])
        return self.endorsement(key, tcb, **kw)  # type: ignore[arg-type]

    def vlek(self, key: ec.EllipticCurvePrivateKey, tcb: TcbVersion, **kw: object) -> x509.Certificate:
        return self.endorsement(key, tcb, csp_id="cc-test.example", vlek=True, **kw)  # type: ignore[arg-type]


def rogue_key() -> rsa.RSAPrivateKey:
    """An RSA-4096 key that is no product's ARK (used for Milan-named forgeries)."""
    return rsa_keys()[3]


def chip_id_for(product: Product, seed: int = 1) -> bytes:
    body = bytes((seed * 37 + i) & 0xFF or 1 for i in range(64))
    return body[:8] + bytes(56) if product is Product.TURIN else body


def make_report(
    product: Product,
    key: ec.EllipticCurvePrivateKey,
    tcb: TcbVersion,
    *,
    chip_id: bytes | None = None,
    version: int = 5,
    signing_key: SigningKey = SigningKey.VCEK,
    mask_chip_key: bool = False,
    policy: int = int(PolicyFlag.RESERVED_MBO | PolicyFlag.SMT),
    raw_tcb: dict[str, int] | None = None,
    **fields: object,
) -> bytes:
    """A report for ``product`` signed by ``key``; ``raw_tcb`` overrides TCB fields with raw u64 values."""
    tcb_raw = tcb.to_u64(product.tcb_layout)
    fam, mod, step = CPUID[product] if version >= 3 else (0, 0, 0)
    values: dict[str, object] = dict(
        version=version,
        guest_svn=1,
        policy=GuestPolicy.from_u64(policy),
        family_id=bytes(16),
        image_id=bytes(16),
        vmpl=0,
        signature_algo=1,
        current_tcb=tcb_raw,
        platform_info=PlatformInfo.SMT_EN,
        key_info=KeyInfo(mask_chip_key=mask_chip_key, signing_key=signing_key),
        report_data=bytes(range(64)),
        measurement=bytes([0xA5]) * 48,
        host_data=bytes(32),
        id_key_digest=bytes(48),
        author_key_digest=bytes(48),
        report_id=bytes([7]) * 32,
        report_id_ma=b"\xff" * 32,
        reported_tcb=tcb_raw,
        chip_id=chip_id if chip_id is not None else bytes(64) if mask_chip_key else chip_id_for(product),
        committed_tcb=tcb_raw,
        current_build=43,
        current_minor=55,
        current_major=1,
        committed_build=43,
        committed_minor=55,
        committed_major=1,
        launch_tcb=tcb_raw,
        cpuid_fam_id=fam,
        cpuid_mod_id=mod,
        cpuid_step=step,
    )
    values.update(raw_tcb or {})
    values.update(fields)
    report = AttestationReport(**values)  # type: ignore[arg-type]
    return sign_report(report, key)


def sign_report(report: AttestationReport | bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    parsed = report if isinstance(report, AttestationReport) else AttestationReport.from_bytes(report)
    der = key.sign(parsed.to_bytes()[:SIGNED_LEN], ec.ECDSA(hashes.SHA384()))
    r, s = decode_dss_signature(der)
    return parsed.replace(signature_r=r, signature_s=s).to_bytes()


TCB = {
    Product.MILAN: TcbVersion(boot_loader=3, tee=0, snp=8, microcode=115),
    Product.GENOA: TcbVersion(boot_loader=9, tee=0, snp=23, microcode=72),
    Product.TURIN: TcbVersion(fmc=1, boot_loader=1, tee=0, snp=3, microcode=75),
}
