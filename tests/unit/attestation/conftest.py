"""Fixtures for the attestation tests: the real AMD vectors and a synthetic AMD-shaped PKI per product."""

from __future__ import annotations

from pathlib import Path

import pytest
from attest_pki import Pki
from real_vectors import RealEvidence, load_real

from cvmotion.abi.snp import Product
from cvmotion.attestation.trust import TrustStore


@pytest.fixture(scope="session")
def real(vectors_dir: Path) -> dict[str, RealEvidence]:
    return load_real(vectors_dir)


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
