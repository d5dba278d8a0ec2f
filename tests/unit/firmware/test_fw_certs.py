"""firmware.certs / keys: the emulated ARK -> ASK -> VCEK and ARK -> ASVK -> VLEK look like AMD's and chain."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from cvmotion.abi.snp import Product, TcbVersion
from cvmotion.abi.vcek import OID_FMC_SPL, OID_HWID, OID_SPL_4
from cvmotion.firmware.certs import EMULATED_ORG, amd_extensions_of
from cvmotion.firmware.chip import Chip, default_tcb
from cvmotion.firmware.keys import derive_vcek
from cvmotion.firmware.vendor import Vendor


def _verify_pss(issuer: x509.Certificate, cert: x509.Certificate, salt: int = 48) -> None:
    key = issuer.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=salt)
    key.verify(cert.signature, cert.tbs_certificate_bytes, pss, hashes.SHA384())


def _cn(name: x509.Name) -> str:
    return str(name.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _org(name: x509.Name) -> str:
    return str(name.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value)


def test_vcek_is_deterministic_per_chip_and_tcb() -> None:
    tcb = default_tcb(Product.GENOA)
    newer = TcbVersion(boot_loader=tcb.boot_loader, tee=tcb.tee, snp=tcb.snp + 1, microcode=tcb.microcode)

    def pub(secret: bytes, t: TcbVersion) -> ec.EllipticCurvePublicNumbers:
        return derive_vcek(secret, Product.GENOA, t).public_key().public_numbers()

    assert pub(b"\1" * 32, tcb) == pub(b"\1" * 32, tcb)
    assert pub(b"\1" * 32, tcb) != pub(b"\1" * 32, newer)  # TCB update -> new VCEK
    assert pub(b"\1" * 32, tcb) != pub(b"\2" * 32, tcb)  # another chip -> another VCEK
    assert derive_vcek(b"\1" * 32, Product.GENOA, tcb).curve.name == "secp384r1"


@pytest.mark.parametrize("product", list(Product), ids=lambda p: p.value)
def test_hierarchy_shape_and_signatures(emulated_vendor: Vendor, tmp_path: Path, product: Product) -> None:
    chip = Chip.create(tmp_path / "h", emulated_vendor, product, seed=21)
    roots = emulated_vendor.roots(product)
    ark, ask = roots.ark.cert, roots.ask.cert
    vcek = emulated_vendor.vcek_cert(product, chip.hwid, chip.reported_tcb)
    assert vcek is not None
    for cert, cn in ((ark, f"ARK-{product.value}"), (ask, f"SEV-{product.value}"), (vcek, "SEV-VCEK")):
        assert cert.version is x509.Version.v3
        assert cert.serial_number > 0
        assert cert.signature_algorithm_oid == SignatureAlgorithmOID.RSASSA_PSS
        assert _cn(cert.subject) == cn
        assert _org(cert.subject) == EMULATED_ORG
    _verify_pss(ark, ark)
    _verify_pss(ark, ask)
    _verify_pss(ask, vcek)
    with pytest.raises(InvalidSignature):
        _verify_pss(ask, vcek, salt=32)  # the salt length is exactly 48
    assert vcek.issuer == ask.subject
    assert ask.issuer == ark.subject
    assert ark.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ask.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    assert ark.extensions.get_extension_for_class(x509.KeyUsage).value.crl_sign
    assert ask.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    ark_key = ark.public_key()
    assert isinstance(ark_key, rsa.RSAPublicKey)
    assert ark_key.key_size == 4096
    lifetime = vcek.not_valid_after_utc - vcek.not_valid_before_utc
    assert dt.timedelta(days=7 * 365) <= lifetime <= dt.timedelta(days=7 * 366)


@pytest.mark.parametrize(
    ("product", "struct_version", "name", "hwid_len"),
    [(Product.MILAN, 0, "Milan-B0", 64), (Product.GENOA, 0, "Genoa", 64), (Product.TURIN, 1, "Turin", 8)],
    ids=["milan", "genoa", "turin"],
)
def test_vcek_extensions(
    emulated_vendor: Vendor, tmp_path: Path, product: Product, struct_version: int, name: str, hwid_len: int
) -> None:
    chip = Chip.create(tmp_path / "h", emulated_vendor, product, seed=22)
    vcek = emulated_vendor.vcek_cert(product, chip.hwid, chip.reported_tcb)
    assert vcek is not None
    ext = amd_extensions_of(vcek)
    assert ext.struct_version == struct_version
    assert ext.product_name == name
    assert ext.tcb == chip.reported_tcb
    assert ext.hwid == chip.chip_id[:hwid_len]
    assert ext.csp_id is None
    oids = {e.oid.dotted_string for e in vcek.extensions}
    assert (OID_FMC_SPL in oids) is (product is Product.TURIN)
    assert (OID_SPL_4 in oids) is (product is not Product.TURIN)
    hwid_ext = vcek.extensions.get_extension_for_oid(x509.ObjectIdentifier(OID_HWID))
    assert not hwid_ext.critical
    key = vcek.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    expected = derive_vcek(chip.chip_secret, product, chip.reported_tcb).public_key()
    assert key.public_numbers() == expected.public_numbers()


def test_vcek_cache_serves_the_same_certificate(emulated_vendor: Vendor, tmp_path: Path) -> None:
    chip = Chip.create(tmp_path / "h", emulated_vendor, Product.GENOA, seed=23)
    first = emulated_vendor.vcek_cert(Product.GENOA, chip.hwid, chip.reported_tcb)
    again = Vendor.open(emulated_vendor.root).vcek_cert(Product.GENOA, chip.hwid, chip.reported_tcb)
    assert first == again
    assert emulated_vendor.vcek_cert(Product.GENOA, bytes(64), chip.reported_tcb) is None  # never manufactured


def test_vlek_certificate(emulated_vendor: Vendor, tmp_path: Path) -> None:
    chip = Chip.create(tmp_path / "h", emulated_vendor, Product.MILAN, seed=24)
    issue = emulated_vendor.issue_vlek(Product.MILAN, "cc-emulated.example", chip.reported_tcb, chip.chip_id)
    asvk = emulated_vendor.asvk(Product.MILAN).cert
    ark = emulated_vendor.roots(Product.MILAN).ark.cert
    assert _cn(issue.cert.subject) == "SEV-VLEK"
    assert _cn(asvk.subject) == "SEV-VLEK-Milan"
    assert issue.cert.serial_number > 0
    _verify_pss(asvk, issue.cert)
    _verify_pss(ark, asvk)
    ext = amd_extensions_of(issue.cert)
    assert ext.csp_id == "cc-emulated.example"
    assert ext.hwid is None
    assert ext.product_name == "Milan"
    assert ext.tcb == chip.reported_tcb
    # Per (CSP, TCB), not per chip: a second issue certifies the same key.
    other = emulated_vendor.issue_vlek(Product.MILAN, "cc-emulated.example", chip.reported_tcb, chip.chip_id)
    assert other.cert.public_key() == issue.cert.public_key()
    assert other.hashstick != issue.hashstick  # fresh wrapping nonce
    chain = x509.load_pem_x509_certificates(emulated_vendor.vlek_chain_pem(Product.MILAN))
    assert [_cn(c.subject) for c in chain] == ["SEV-VLEK-Milan", "ARK-Milan"]
