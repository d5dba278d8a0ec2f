"""firmware.vendor / firmware.chip: persistence, permissions, determinism, TCB updates."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from cvmotion.abi.snp import Product, TcbVersion
from cvmotion.errors import AbiError, FirmwareError, FirmwareStatus, UsageError
from cvmotion.firmware.chip import Chip, default_tcb
from cvmotion.firmware.vendor import Vendor


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_vendor_hierarchy_is_persisted_once(emulated_vendor: Vendor) -> None:
    roots = emulated_vendor.roots(Product.GENOA)
    pdir = emulated_vendor.root / "Genoa"
    assert _mode(pdir / "ark.key") == 0o600
    assert _mode(pdir / "ask.key") == 0o600
    # A second process opening the same directory sees the same keys, not new ones.
    again = Vendor.open(emulated_vendor.root).roots(Product.GENOA)
    assert again.ark.cert == roots.ark.cert
    assert again.ask.cert == roots.ask.cert
    chain = emulated_vendor.cert_chain_pem(Product.GENOA)
    assert chain == roots.ask.cert.public_bytes(Encoding.PEM) + roots.ark.cert.public_bytes(Encoding.PEM)
    assert "EMULATED" in (emulated_vendor.root / "README.txt").read_text()


def test_vendor_dir_must_be_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        Vendor.open(tmp_path / "file")


def test_chip_persists_and_reloads(emulated_vendor: Vendor, tmp_path: Path) -> None:
    chip = Chip.create(tmp_path / "h", emulated_vendor, Product.MILAN, seed=11)
    assert _mode(tmp_path / "h" / "chip.secret") == 0o600
    loaded = Chip.load(tmp_path / "h")
    assert loaded == chip
    assert "chip_secret" not in (tmp_path / "h" / "chip.json").read_text()
    assert emulated_vendor.chip_secret(Product.MILAN, chip.hwid) == chip.chip_secret
    fuse = emulated_vendor.root / "fuses" / "Milan" / f"{chip.hwid.hex()}.json"
    assert _mode(fuse) == 0o600


def test_seeded_chips_are_deterministic(emulated_vendor: Vendor, tmp_path: Path) -> None:
    a = Chip.create(tmp_path / "a", emulated_vendor, Product.GENOA, seed=12)
    b = Chip.create(tmp_path / "b", emulated_vendor, Product.GENOA, seed=12)  # same chip, "re-manufactured"
    c = Chip.create(tmp_path / "c", emulated_vendor, Product.GENOA, seed=13)
    assert (a.chip_id, a.chip_secret) == (b.chip_id, b.chip_secret)
    assert a.chip_id != c.chip_id
    assert a.chip_secret != c.chip_secret
    assert len(a.chip_id) == 64


def test_turin_chip_id_shape(emulated_vendor: Vendor, tmp_path: Path) -> None:
    chip = Chip.create(tmp_path / "t", emulated_vendor, Product.TURIN, seed=14)
    assert len(chip.chip_id) == 64
    assert any(chip.chip_id[:8])
    assert not any(chip.chip_id[8:])
    assert chip.hwid == chip.chip_id[:8]
    assert chip.cpuid.family == 0x1A


@pytest.mark.parametrize(
    ("product", "family", "model"),
    [(Product.MILAN, 0x19, 0x01), (Product.GENOA, 0x19, 0x11), (Product.TURIN, 0x1A, 0x02)],
    ids=["milan", "genoa", "turin"],
)
def test_cpuid_is_consistent_with_product(
    emulated_vendor: Vendor, tmp_path: Path, product: Product, family: int, model: int
) -> None:
    chip = Chip.create(tmp_path / "x", emulated_vendor, product, seed=15)
    assert (chip.cpuid.family, chip.cpuid.model) == (family, model)
    assert Product.from_cpuid(chip.cpuid.family, chip.cpuid.model) is product


def test_create_refuses_existing_chip(emulated_vendor: Vendor, tmp_path: Path) -> None:
    Chip.create(tmp_path / "h", emulated_vendor, Product.GENOA, seed=16)
    with pytest.raises(UsageError, match="already holds a chip"):
        Chip.create(tmp_path / "h", emulated_vendor, Product.GENOA, seed=17)


def test_load_reports_missing_and_corrupt(emulated_vendor: Vendor, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        Chip.load(tmp_path / "nothing")
    Chip.create(tmp_path / "h", emulated_vendor, Product.GENOA, seed=18)
    doc = json.loads((tmp_path / "h" / "chip.json").read_text())
    doc["current_tcb"] = "0x0000ff0000000000"  # reserved TCB byte 5 set
    (tmp_path / "h" / "chip.json").write_text(json.dumps(doc))
    with pytest.raises(UsageError, match="corrupt"):
        Chip.load(tmp_path / "h")
    (tmp_path / "h" / "chip.json").write_text("{not json")
    with pytest.raises(UsageError, match="cannot read"):
        Chip.load(tmp_path / "h")


def test_tcb_update_commit_and_rollback(emulated_vendor: Vendor, tmp_path: Path) -> None:
    chip = Chip.create(tmp_path / "h", emulated_vendor, Product.GENOA, seed=19)
    base = default_tcb(Product.GENOA)
    newer = TcbVersion(boot_loader=base.boot_loader, tee=base.tee, snp=base.snp + 1, microcode=base.microcode)
    updated = chip.set_tcb(newer)
    assert (updated.current_tcb, updated.reported_tcb, updated.committed_tcb) == (newer, newer, base)
    assert Chip.load(tmp_path / "h").reported_tcb == newer
    held = updated.set_tcb(newer, reported=base)  # SNP_SET_CONFIG keeps the reported TCB back
    assert held.reported_tcb == base
    with pytest.raises(FirmwareError) as info:
        held.set_tcb(base, reported=newer)
    assert info.value.status is FirmwareStatus.INVALID_PARAM
    committed = held.set_tcb(newer, commit=True)
    with pytest.raises(FirmwareError) as info:
        committed.set_tcb(base)  # below the committed TCB: anti-rollback
    assert info.value.status is FirmwareStatus.BAD_SVN
    with pytest.raises(AbiError):
        committed.set_tcb(TcbVersion(boot_loader=300, tee=0, snp=30, microcode=84))


def test_vendor_rejects_conflicting_registration(emulated_vendor: Vendor) -> None:
    chip_id = bytes(range(64))
    emulated_vendor.register_chip(Product.GENOA, chip_id, b"\1" * 32)
    emulated_vendor.register_chip(Product.GENOA, chip_id, b"\1" * 32)  # idempotent
    with pytest.raises(UsageError, match="already registered"):
        emulated_vendor.register_chip(Product.GENOA, chip_id, b"\2" * 32)
