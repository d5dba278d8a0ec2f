"""attestation.trust and certificate loading: AMD pins, emulated anchors, PEM/DER, the serial-0 warning."""

from __future__ import annotations

import hashlib
import warnings

import pytest
from attest_pki import Pki, make_cert, rogue_key
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.utils import CryptographyDeprecationWarning
from real_vectors import RealEvidence

from cvmotion.abi.snp import Product
from cvmotion.attestation.evidence import load_certificate, load_certificates, spki_sha256
from cvmotion.attestation.trust import AMD_ARK_PINS, PlatformKind, TrustStore
from cvmotion.errors import MalformedStructure, UsageError, VerificationError


def _ark(ev: RealEvidence):  # type: ignore[no-untyped-def]
    return next(c for c in ev.chain if c.subject == c.issuer)


@pytest.mark.parametrize("name", ["milan", "genoa"])
def test_amd_pins_match_the_real_arks(real: dict[str, RealEvidence], name: str) -> None:
    ark = _ark(real[name])
    spki = ark.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert hashlib.sha256(spki).digest() == AMD_ARK_PINS[real[name].product] == spki_sha256(ark)
    anchor = TrustStore.amd().anchor_for(ark)
    assert (anchor.kind, anchor.product, anchor.certificate) == (PlatformKind.AMD_SEV_SNP, real[name].product, None)


def test_amd_store_has_three_pins() -> None:
    store = TrustStore.amd()
    assert {a.name for a in store} == {"ARK-Milan", "ARK-Genoa", "ARK-Turin"}
    assert len(store) == 3
    assert store.certificates() == ()
    assert AMD_ARK_PINS[Product.TURIN].hex() == "4f125410563a2ab9a50356f9243f6fe0b6f73de98603f53f90339c70e9d7ad08"


def test_with_anchor_is_functional(pki: dict[Product, Pki]) -> None:
    base = TrustStore.amd()
    store = base.with_anchor(pki[Product.GENOA].ark)
    assert len(base) == 3
    assert len(store) == 4
    anchor = store.anchor_for(pki[Product.GENOA].ark)
    assert (anchor.kind, anchor.product, anchor.name) == (PlatformKind.EMULATED, Product.GENOA, "ARK-Genoa")
    assert store.certificates() == (pki[Product.GENOA].ark,)
    with pytest.raises(VerificationError, match="ARK CN='ARK-Genoa' .* is not a trusted root"):
        base.anchor_for(pki[Product.GENOA].ark)


def test_with_anchors_from_pem_reads_several(pki: dict[Product, Pki]) -> None:
    pem = b"".join(p.ark.public_bytes(Encoding.PEM) for p in pki.values())
    store = TrustStore.empty().with_anchors_from_pem(pem)
    assert {a.product for a in store} == set(Product)
    der_store = TrustStore.empty().with_anchors_from_pem(pki[Product.TURIN].ark.public_bytes(Encoding.DER))
    assert [a.product for a in der_store] == [Product.TURIN]


def test_with_anchor_refuses_non_arks(pki: dict[Product, Pki]) -> None:
    with pytest.raises(UsageError, match="CN='SEV-Milan' is not an ARK"):
        TrustStore.empty().with_anchor(pki[Product.MILAN].ask)
    forged = make_cert(
        subject=pki[Product.MILAN].ark.subject,
        issuer=pki[Product.MILAN].ark.subject,
        public_key=pki[Product.MILAN].ark_key.public_key(),
        signer=rogue_key(),
        ca=True,
    )
    with pytest.raises(UsageError, match="not a self-signed ARK"):
        TrustStore.empty().with_anchor(forged)


def test_real_ark_cannot_be_re_added_as_emulated(real: dict[str, RealEvidence]) -> None:
    with pytest.raises(UsageError, match="same key as ARK-Milan"):
        TrustStore.amd().with_anchor(_ark(real["milan"]))
    # Adding it as what it is, is harmless.
    assert (
        TrustStore.amd().with_anchor(_ark(real["milan"]), PlatformKind.AMD_SEV_SNP).anchor_for(_ark(real["milan"])).kind
        is PlatformKind.AMD_SEV_SNP
    )


def test_load_certificates_pem_and_der(vectors_dir) -> None:  # type: ignore[no-untyped-def]
    pem = (vectors_dir / "snp/milan-v2/ask_ark_milan.pem").read_bytes()
    certs = load_certificates(pem)
    assert [c.subject.rfc4514_string().split(",")[0] for c in certs] == ["CN=SEV-Milan", "CN=ARK-Milan"]
    der = certs[0].public_bytes(Encoding.DER)
    assert load_certificate(der) == certs[0]
    with pytest.raises(MalformedStructure, match="expected one certificate, found 2"):
        load_certificate(pem, what="--vcek x")


@pytest.mark.parametrize(
    "data",
    [b"", b"garbage", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", bytes(100)],
    ids=["empty", "text", "bad-pem", "zeros"],
)
def test_load_certificates_rejects_junk(data: bytes) -> None:
    with pytest.raises(MalformedStructure, match="chain.pem: not a PEM or DER X.509 certificate|no certificate"):
        load_certificates(data, what="chain.pem")


def test_serial_zero_warning_is_silenced_only_while_loading(vectors_dir) -> None:  # type: ignore[no-untyped-def]
    """AMD's VCEKs have serial 0. Loading them must not warn (pytest turns warnings into errors); the
    filter is narrow and scoped, so reading the serial afterwards still warns as cryptography intends."""
    raw = (vectors_dir / "snp/genoa-v5/vcek.der").read_bytes()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cert = load_certificate(raw)
    assert caught == []
    with pytest.warns(CryptographyDeprecationWarning, match="serial number"):
        assert cert.serial_number == 0
