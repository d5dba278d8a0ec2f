"""Fixtures for the attestation tests: the real AMD vectors and a synthetic AMD-shaped PKI per product."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from attest_pki import Pki
from cryptography import x509

from cvmotion.abi.snp import Product
from cvmotion.attestation.evidence import load_certificate, load_certificates
from cvmotion.attestation.trust import TrustStore


@dataclass(frozen=True)
class RealEvidence:
    name: str
    raw: bytes
    vcek: x509.Certificate
    chain: list[x509.Certificate]
    at: datetime
    product: Product


def _load_real(vectors: Path) -> dict[str, RealEvidence]:
    snp = vectors / "snp"
    milan = RealEvidence(
        "milan-v2",
        (snp / "milan-v2/attestation.bin").read_bytes(),
        load_certificate((snp / "milan-v2/vcek.der").read_bytes()),
        load_certificates((snp / "milan-v2/ask_ark_milan.pem").read_bytes()),
        datetime(2025, 1, 1, tzinfo=UTC),
        Product.MILAN,
    )
    genoa = RealEvidence(
        "genoa-v5",
        (snp / "genoa-v5/report.bin").read_bytes(),
        load_certificate((snp / "genoa-v5/vcek.der").read_bytes()),
        load_certificates((snp / "genoa-v5/ark_genoa.pem").read_bytes())
        + load_certificates((snp / "genoa-v5/ask_genoa.pem").read_bytes()),
        datetime(2025, 9, 12, tzinfo=UTC),  # the upstream (Oak) test's time
        Product.GENOA,
    )
    return {"milan": milan, "genoa": genoa}


@pytest.fixture(scope="session")
def real(vectors_dir: Path) -> dict[str, RealEvidence]:
    return _load_real(vectors_dir)


@pytest.fixture(scope="session")
def pki() -> dict[Product, Pki]:
    return {product: Pki(product) for product in Product}


@pytest.fixture(scope="session")
def test_trust(pki: dict[Product, Pki]) -> TrustStore:
    """AMD's pins plus the synthetic ARKs as emulated anchors."""
    store = TrustStore.amd()
    for p in pki.values():
        store = store.with_anchor(p.ark)
    return store
