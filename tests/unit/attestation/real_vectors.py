"""The real AMD SEV-SNP evidence in ../shared/vectors/snp (see its provenance), loaded for the tests.

A module of its own rather than the conftest: test modules import ``RealEvidence`` by name, and
``conftest`` is not a unique module name across the suite.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from cvmotion.abi.snp import Product
from cvmotion.attestation.evidence import load_certificate, load_certificates


@dataclass(frozen=True)
class RealEvidence:
    name: str
    raw: bytes
    vcek: x509.Certificate
    chain: list[x509.Certificate]
    at: datetime
    product: Product


def load_real(vectors: Path) -> dict[str, RealEvidence]:
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
