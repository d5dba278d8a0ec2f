"""attestation.verify on synthetic AMD-shaped evidence: Turin and VLEK paths, and one test per chain rule."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cache

import pytest
from attest_pki import AT, PSS48, TCB, Pki, chip_id_for, make_cert, make_report, p384, rogue_key, rsa_keys
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from cvmotion.abi.snp import Product, SigningKey
from cvmotion.abi.vcek import OID_FMC_SPL, OID_HWID, OID_SPL_4, der_integer
from cvmotion.attestation.trust import PlatformKind, TrustStore
from cvmotion.attestation.verify import VerifyOptions, verify_report
from cvmotion.errors import AbiError, ReservedNotZero, VerificationError

KEY, OTHER_KEY = p384(1), p384(2)


@dataclass
class Evidence:
    raw: bytes
    cert: x509.Certificate
    chain: list[x509.Certificate]
    trust: TrustStore | None = None  # None: the session's test_trust
    options: VerifyOptions = field(default_factory=lambda: VerifyOptions(cache=None))

    def verify(self, trust: TrustStore):  # type: ignore[no-untyped-def]
        return verify_report(self.raw, self.cert, self.chain, self.trust or trust, at=AT, options=self.options)


def vcek_evidence(pki: Pki, *, report_kw: dict[str, object] | None = None, **cert_kw: object) -> Evidence:
    product = pki.product
    cert = pki.vcek(KEY, TCB[product], chip_id_for(product), **cert_kw)
    return Evidence(make_report(product, KEY, TCB[product], **(report_kw or {})), cert, pki.chain())  # type: ignore[arg-type]


def vlek_evidence(pki: Pki, *, report_kw: dict[str, object] | None = None, **cert_kw: object) -> Evidence:
    product = pki.product
    cert = pki.vlek(KEY, TCB[product], **cert_kw)
    raw = make_report(product, KEY, TCB[product], signing_key=SigningKey.VLEK, **(report_kw or {}))  # type: ignore[arg-type]
    return Evidence(raw, cert, pki.chain(vlek=True))


# --- accepted --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("product", list(Product), ids=lambda p: p.value)
@pytest.mark.parametrize("version", [2, 3, 5])
def test_vcek_evidence_verifies(
    pki: dict[Product, Pki], test_trust: TrustStore, product: Product, version: int
) -> None:
    v = vcek_evidence(pki[product], report_kw={"version": version}).verify(test_trust)
    assert (v.product, v.platform, v.signing_key) == (product, PlatformKind.EMULATED, SigningKey.VCEK)
    assert v.reported_tcb == TCB[product]
    assert v.anchor.name == f"ARK-{product.value}"


def test_turin_vcek_shape(pki: dict[Product, Pki], test_trust: TrustStore) -> None:
    """Turin: structVersion 1, fmcSPL present, spl_4 absent, 8-byte hwID, v5 report with CPUID family 0x1A."""
    ev = vcek_evidence(pki[Product.TURIN])
    values = {e.oid.dotted_string: e.value.value for e in ev.cert.extensions}  # type: ignore[attr-defined]
    assert OID_SPL_4 not in values
    assert OID_FMC_SPL in values
    assert len(values[OID_HWID]) == 8
    v = ev.verify(test_trust)
    assert v.extensions.struct_version == 1
    assert v.reported_tcb.fmc == 1
    assert v.report.cpuid_fam_id == 0x1A
    assert v.report.chip_id[8:] == bytes(56)


@pytest.mark.parametrize("product", list(Product), ids=lambda p: p.value)
def test_vlek_evidence_verifies(pki: dict[Product, Pki], test_trust: TrustStore, product: Product) -> None:
    v = vlek_evidence(pki[product]).verify(test_trust)
    assert (v.product, v.signing_key) == (product, SigningKey.VLEK)
    assert v.extensions.csp_id == "cc-test.example"
    assert v.extensions.hwid is None
    assert v.extensions.product_name == product.value
    assert v.intermediate.subject == pki[product].asvk.subject


def test_masked_chip_id_skips_hwid_binding(pki: dict[Product, Pki], test_trust: TrustStore) -> None:
    v = vcek_evidence(pki[Product.GENOA], report_kw={"mask_chip_key": True}).verify(test_trust)
    assert v.chip_id_masked
    assert v.report.chip_id == bytes(64)


def test_anchor_kind_decides_the_platform(pki: dict[Product, Pki]) -> None:
    ev = vcek_evidence(pki[Product.MILAN])
    as_amd = TrustStore.empty().with_anchor(pki[Product.MILAN].ark, PlatformKind.AMD_SEV_SNP)
    assert ev.verify(as_amd).platform is PlatformKind.AMD_SEV_SNP


def test_chain_completed_from_an_emulated_anchor(pki: dict[Product, Pki], test_trust: TrustStore) -> None:
    ev = vcek_evidence(pki[Product.GENOA])
    ev.chain = [pki[Product.GENOA].ask]  # no ARK in the evidence: the anchor's certificate completes it
    assert ev.verify(test_trust).product is Product.GENOA


# --- rejected: one case per rule --------------------------------------------------------------------------


@cache
def _rsa2048() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


def _bad_ask(pki: Pki, **kw: object) -> Evidence:
    """A Milan chain whose ASK is re-issued with ``kw`` changes (same key, same names)."""
    ev = vcek_evidence(pki)
    ask = make_cert(
        subject=pki.ask.subject,
        issuer=pki.ark.subject,
        public_key=kw.pop("public_key", pki.ask_key.public_key()),  # type: ignore[arg-type]
        signer=pki.ark_key,
        **{"ca": True, **kw},  # type: ignore[arg-type]
    )
    ev.chain = [ask, pki.ark]
    return ev


def _small_ask(pki: Pki) -> Evidence:
    ev = vcek_evidence(pki, signer=_rsa2048())
    ask = make_cert(
        subject=pki.ask.subject, issuer=pki.ark.subject, public_key=_rsa2048().public_key(), signer=pki.ark_key, ca=True
    )
    ev.chain = [ask, pki.ark]
    return ev


def _ark_not_self_signed(pki: Pki) -> Evidence:
    ev = vcek_evidence(pki)
    ark = make_cert(
        subject=pki.ark.subject,
        issuer=pki.ark.subject,
        public_key=pki.ark_key.public_key(),
        signer=rogue_key(),
        ca=True,
    )
    ev.chain = [pki.ask, ark]
    return ev


def _other_chip(pki: Pki) -> Evidence:
    ev = vcek_evidence(pki)
    ev.cert = pki.vcek(KEY, TCB[pki.product], chip_id_for(pki.product, seed=2))
    return ev


def _tcb_mismatch(pki: Pki) -> Evidence:
    ev = vcek_evidence(pki)
    ev.cert = pki.vcek(
        KEY, dataclasses.replace(TCB[pki.product], snp=TCB[pki.product].snp + 1), chip_id_for(pki.product)
    )
    return ev


def _anchored_as_other_product(pki: Pki) -> Evidence:
    # ARK-Milan whose key is the Genoa anchor's key.
    milan = Pki(Product.MILAN, ark_key=rsa_keys()[1])
    return vcek_evidence(milan)


Case = Callable[[dict[Product, Pki]], Evidence]
M, G, T = Product.MILAN, Product.GENOA, Product.TURIN
P256 = ec.derive_private_key(7, ec.SECP256R1())

REJECTED: list[tuple[str, Case, type[Exception], str]] = [
    (
        "vcek-other-key",
        lambda k: dataclasses.replace(vcek_evidence(k[G]), cert=k[G].vcek(OTHER_KEY, TCB[G], chip_id_for(G))),
        VerificationError,
        "report signature does not verify",
    ),
    ("vcek-other-chip", lambda k: _other_chip(k[G]), VerificationError, "VCEK of another chip"),
    ("tcb-mismatch", lambda k: _tcb_mismatch(k[M]), VerificationError, "TCB binding"),
    (
        "turin-fmc-mismatch",
        lambda k: vcek_evidence(k[T], report_kw={"reported_tcb": 0x4B00000003000102}),
        VerificationError,
        r"TCB binding: REPORTED_TCB \(fmc=2",
    ),
    (
        "turin-hwid-64-bytes",
        lambda k: vcek_evidence(k[T], hwid=bytes(range(1, 65))),
        VerificationError,
        "hwID is 64 bytes, expected 8",
    ),
    (
        "turin-chip-id-tail",
        lambda k: vcek_evidence(k[T], report_kw={"chip_id": chip_id_for(T)[:8] + b"\x01" + bytes(55)}),
        VerificationError,
        "CHIP_ID bytes 0x8..0x3f must be zero",
    ),
    ("turin-missing-fmcspl", lambda k: vcek_evidence(k[T], drop=(OID_FMC_SPL,)), VerificationError, "lacks fmcSPL"),
    (
        "genoa-with-fmcspl",
        lambda k: vcek_evidence(k[G], extra={OID_FMC_SPL: der_integer(0)}),
        VerificationError,
        "carries fmcSPL",
    ),
    (
        "masked-but-chip-id",
        lambda k: vcek_evidence(k[G], report_kw={"mask_chip_key": True, "chip_id": chip_id_for(G)}),
        VerificationError,
        "MASK_CHIP_KEY is set but CHIP_ID is not zero",
    ),
    (
        "struct-version-7",
        lambda k: vcek_evidence(k[G], struct_version=7),
        VerificationError,
        "structVersion 7 is not supported",
    ),
    (
        "unknown-product-name",
        lambda k: vcek_evidence(k[G], product_name="Bergamo"),
        VerificationError,
        "unknown SEV-SNP product name 'Bergamo'",
    ),
    (
        "product-name-vs-ask",
        lambda k: vcek_evidence(k[G], product_name="Milan-B0"),
        VerificationError,
        "product mismatch: VCEK productName 'Milan-B0' but issuer CN='SEV-Genoa'",
    ),
    (
        "cpuid-vs-chain",
        lambda k: vcek_evidence(k[G], report_kw={"cpuid_mod_id": 0x01}),
        VerificationError,
        "product mismatch: .* CPUID_FAM_ID/MOD_ID 0x19/0x1 is Milan",
    ),
    (
        "pin-vs-chain",
        lambda k: dataclasses.replace(vcek_evidence(k[T]), options=VerifyOptions(product=G, cache=None)),
        VerificationError,
        "the expected product is Genoa",
    ),
    (
        "anchor-product",
        lambda k: _anchored_as_other_product(k[M]),
        VerificationError,
        "trust anchor ARK-Genoa is Genoa",
    ),
    (
        "vcek-p256-key",
        lambda k: dataclasses.replace(vcek_evidence(k[M]), cert=k[M].vcek(P256, TCB[M], chip_id_for(M))),
        VerificationError,
        "not an ECDSA P-384 key",
    ),
    (
        "vcek-with-cspid",
        lambda k: vcek_evidence(k[M], csp_id="cc.example"),
        VerificationError,
        "VCEK certificate must carry hwID and no cspId",
    ),
    ("vcek-without-hwid", lambda k: vcek_evidence(k[M], drop=(OID_HWID,)), VerificationError, "must carry hwID"),
    (
        "vlek-with-hwid",
        lambda k: vlek_evidence(k[M], hwid=bytes(64)),
        VerificationError,
        "VLEK certificate must carry cspId and no hwID",
    ),
    (
        "vlek-signed-by-ask",
        lambda k: vlek_evidence(k[M], signer=k[M].ask_key, issuer_cn="SEV-Milan"),
        VerificationError,
        "issuer CN='SEV-Milan' \\(expected SEV-VLEK-Milan\\)",
    ),
    (
        "vlek-without-asvk",
        lambda k: dataclasses.replace(vlek_evidence(k[G]), chain=k[G].chain()),
        VerificationError,
        "no ASVK SEV-VLEK-Genoa",
    ),
    (
        "vlek-cert-for-vcek-report",
        lambda k: dataclasses.replace(vlek_evidence(k[G]), raw=make_report(G, KEY, TCB[G])),
        VerificationError,
        "SIGNING_KEY is VCEK but the endorsement certificate is CN='SEV-VLEK'",
    ),
    (
        "vcek-pss-salt-32",
        lambda k: vcek_evidence(k[M], rsa_padding=padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=32)),
        VerificationError,
        "VCEK certificate signature algorithm is not RSASSA-PSS",
    ),
    (
        "vcek-pss-sha256",
        lambda k: vcek_evidence(
            k[M], hash_alg=hashes.SHA256(), rsa_padding=padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=48)
        ),
        VerificationError,
        "signature algorithm is not RSASSA-PSS SHA-384",
    ),
    (
        "vcek-pkcs1v15",
        lambda k: vcek_evidence(k[M], rsa_padding=padding.PKCS1v15()),
        VerificationError,
        r"signature algorithm is not RSASSA-PSS .*1\.2\.840\.113549\.1\.1\.12",
    ),
    (
        "ask-pss-salt-64",
        lambda k: _bad_ask(k[M], rsa_padding=padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=64)),
        VerificationError,
        "ASK SEV-Milan certificate signature algorithm",
    ),
    ("ask-not-ca", lambda k: _bad_ask(k[M], ca=False), VerificationError, "ASK SEV-Milan certificate is not a CA"),
    ("ask-no-basic-constraints", lambda k: _bad_ask(k[M], ca=None), VerificationError, "lacks basicConstraints"),
    ("ask-rsa-2048", lambda k: _small_ask(k[M]), VerificationError, "ASK SEV-Milan key is not RSA-4096"),
    (
        "ask-expired",
        lambda k: _bad_ask(k[M], not_after=AT - timedelta(seconds=1)),
        VerificationError,
        "certificate ASK SEV-Milan expired",
    ),
    (
        "vcek-not-yet-valid",
        lambda k: vcek_evidence(k[G], not_before=AT + timedelta(days=1)),
        VerificationError,
        "certificate VCEK is not yet valid",
    ),
    (
        "ark-not-self-signed",
        lambda k: _ark_not_self_signed(k[M]),
        VerificationError,
        r"ARK ARK-Milan is not signed by ARK ARK-Milan \(self-signature\)",
    ),
    (
        "untrusted-ark",
        lambda k: dataclasses.replace(vcek_evidence(k[T]), trust=TrustStore.amd()),
        VerificationError,
        "ARK CN='ARK-Turin' .* is not a trusted root",
    ),
    (
        "tcb-reserved-bits",
        lambda k: vcek_evidence(k[G], report_kw={"current_tcb": TCB[G].to_u64(G.tcb_layout) | 1 << 24}),
        ReservedNotZero,
        "TCB_VERSION: reserved bytes 0x2..0x5",
    ),
    (
        "report-signature-zero",
        lambda k: dataclasses.replace(vcek_evidence(k[G]), raw=vcek_evidence(k[G]).raw[:0x2A0] + bytes(0x200)),
        VerificationError,
        "report signature does not verify",
    ),
]


@pytest.mark.parametrize(("case", "error", "match"), [c[1:] for c in REJECTED], ids=[c[0] for c in REJECTED])
def test_rejected(
    pki: dict[Product, Pki], test_trust: TrustStore, case: Case, error: type[Exception], match: str
) -> None:
    ev = case(pki)
    with pytest.raises(error, match=match):
        ev.verify(test_trust)


def test_unknown_critical_extension(pki: dict[Product, Pki], test_trust: TrustStore) -> None:
    pk = pki[Product.MILAN]
    builder = (
        x509.CertificateBuilder()
        .subject_name(pk.name("SEV-VCEK"))
        .issuer_name(pk.ask.subject)
        .public_key(KEY.public_key())
        .serial_number(5)
        .not_valid_before(AT - timedelta(days=1))
        .not_valid_after(AT + timedelta(days=1))
        .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4"), b"\x05\x00"), critical=True)
    )
    ev = vcek_evidence(pk)
    for ext in ev.cert.extensions:
        builder = builder.add_extension(ext.value, critical=ext.critical)
    ev.cert = builder.sign(pk.ask_key, hashes.SHA384(), rsa_padding=PSS48)
    with pytest.raises(VerificationError, match="unsupported critical extension 1.2.3.4"):
        ev.verify(test_trust)


def test_malformed_tcb_is_an_abi_error(pki: dict[Product, Pki], test_trust: TrustStore) -> None:
    ev = vcek_evidence(pki[Product.TURIN], report_kw={"launch_tcb": 1 << 40})
    with pytest.raises(AbiError, match="TCB_VERSION \\(Turin\\)"):
        ev.verify(test_trust)
