"""platformd: the platform's own provisioning — its chip, its pool credential and its trust anchors.

Everything the secure processor and the migration agent trust is set up here, by the platform process on its
first start (or beforehand by the operator: ``cvmotion platform create``, ``cvmotion pool issue``), never by the
host daemon, which is untrusted:

- the chip (``chip.json``, ``chip.secret``) is manufactured by the emulated vendor, which also records its ARK as
  the platform's emulated trust anchor (``trust-anchor.pem``);
- the pool credential (``pool-credential.der``) and the pool CA the MA accepts peers under (``pool-ca.pem``) come
  from the operator's pool CA directory;
- later starts read what is there. A KDS URL or vendor directory given at a later start serves certificates
  only: it never becomes a trust anchor (a hostile daemon could otherwise have the MA trust its own "AMD").
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cvmotion.abi.snp import Product
from cvmotion.agent.pool import check_pool_name, issue_pool_credential, open_pool_ca
from cvmotion.attestation.trust import TrustStore
from cvmotion.errors import MalformedStructure, UsageError
from cvmotion.files import write_atomic
from cvmotion.firmware.chip import CHIP_FILE, TRUST_ANCHOR_FILE, Chip
from cvmotion.firmware.vendor import Vendor
from cvmotion.platformd.ma import POOL_CA_FILE, POOL_CREDENTIAL_FILE

__all__ = ["platform_trust", "provision"]


def provision(
    data_dir: Path,
    *,
    product: str | None,
    vendor_dir: Path | None,
    pool: str | None,
    pool_ca_dir: Path | None,
) -> None:
    """First start: make the chip and have the pool CA issue its credential, where they are missing."""
    if not (data_dir / CHIP_FILE).exists():
        if vendor_dir is None:
            raise UsageError(f"{data_dir} has no chip yet: give --vendor-dir so the emulated vendor can make one")
        try:
            chosen = Product.from_name(product or "Genoa")
        except MalformedStructure as exc:
            raise UsageError(f"--product: {exc}") from None
        Chip.create(data_dir, Vendor.open(vendor_dir), chosen)
    if pool_ca_dir is None or pool is None or (data_dir / POOL_CREDENTIAL_FILE).exists():
        return
    check_pool_name(pool)
    now = datetime.now(UTC)
    authority = open_pool_ca(pool_ca_dir, now=now)
    credential = issue_pool_credential(authority, Chip.load(data_dir).chip_id, pool, now=now)
    der, pem = serialization.Encoding.DER, serialization.Encoding.PEM
    write_atomic(data_dir / POOL_CA_FILE, authority.cert.public_bytes(pem))
    write_atomic(data_dir / POOL_CREDENTIAL_FILE, credential.public_bytes(der))


def platform_trust(data_dir: Path, chip: Chip) -> TrustStore:
    """AMD's pinned ARKs and the emulated ARK recorded when the chip was made (or its maker's, as recorded)."""
    anchor = data_dir / TRUST_ANCHOR_FILE
    if not anchor.exists() and chip.vendor_dir is not None:
        anchor = Vendor.open(chip.vendor_dir).ark_path(chip.product)  # a chip made before the anchor was recorded
    try:
        certs = x509.load_pem_x509_certificates(anchor.read_bytes())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{data_dir}: no readable emulated trust anchor ({TRUST_ANCHOR_FILE}): {exc}") from None
    return TrustStore.amd().with_anchor(certs[-1])
