"""The platform provisions itself (finding 6): its chip, its pool credential and its trust anchors are made once,
by the platform process or the operator, and nothing given at a later start can replace what it trusts."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from cryptography import x509

from cvmotion.abi.snp import Product
from cvmotion.errors import CvmError
from cvmotion.firmware.chip import TRUST_ANCHOR_FILE, Chip
from cvmotion.firmware.vendor import Vendor
from cvmotion.platformd.ma import POOL_CA_FILE, POOL_CREDENTIAL_FILE
from cvmotion.platformd.provision import platform_trust, provision

ROOT = Path(__file__).resolve().parents[3]


def _ark(vendor_dir: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Vendor.open(vendor_dir).ark_path(Product.GENOA).read_bytes())


def test_first_start_makes_chip_anchor_and_credential_and_later_starts_change_nothing(tmp_path: Path) -> None:
    host, maker, other = tmp_path / "host", tmp_path / "vendor", tmp_path / "hostile-vendor"
    provision(host, product="Genoa", vendor_dir=maker, pool="pool-a", pool_ca_dir=tmp_path / "pool-ca")
    files = {
        name: (host / name).read_bytes()
        for name in ("chip.json", TRUST_ANCHOR_FILE, POOL_CA_FILE, POOL_CREDENTIAL_FILE)
    }
    # A later start told of another vendor, pool and pool CA (what a hostile daemon would pass): nothing changes.
    provision(host, product="Milan", vendor_dir=other, pool="pool-b", pool_ca_dir=tmp_path / "hostile-ca")
    assert {name: (host / name).read_bytes() for name in files} == files
    trust = platform_trust(host, Chip.load(host))
    assert trust.anchor_for(_ark(maker))  # the maker's ARK, recorded when the chip was made
    with pytest.raises(CvmError):
        trust.anchor_for(_ark(other))  # never one offered later


def test_no_chip_without_a_vendor(tmp_path: Path) -> None:
    with pytest.raises(CvmError, match="no chip yet"):
        provision(tmp_path / "host", product="Genoa", vendor_dir=None, pool=None, pool_ca_dir=None)


def test_the_host_daemon_writes_nothing_the_platform_trusts() -> None:
    """The untrusted daemon's code never manufactures a chip or issues the platform's pool credential."""
    forbidden = {"Chip.create", "issue_pool_credential", "POOL_CREDENTIAL_FILE", "POOL_CA_FILE", "TRUST_ANCHOR_FILE"}
    for path in (ROOT / "cvmotion" / "host").glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Attribute | ast.Name)}
        assert not names & forbidden, f"{path.name} uses {sorted(names & forbidden)}"
