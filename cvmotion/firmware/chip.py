"""firmware layer: one emulated chip (a host's AMD-SP identity): product, CHIP_ID, fused secret, TCBs, firmware.

Persisted in the host's data directory so a restarted host keeps its identity:

```
DATA_DIR/chip.json     public identity and configuration (product, chip_id, TCBs, firmware, CPUID, ...)
DATA_DIR/chip.secret   the 32-byte fused chip secret                                      (0600)
DATA_DIR/vlek.bin      a loaded VLEK hashstick, if any (wrapped: useless off this chip)   (0600)
```
TCB terms (SNP ABI, "TCB_VERSION"): CURRENT_TCB is the running firmware; COMMITTED_TCB the anti-rollback
floor (SNP_COMMIT); REPORTED_TCB what reports claim and what the VCEK is derived from (the hypervisor may
hold it below CURRENT_TCB with SNP_SET_CONFIG until a new VCEK is distributed).  Changing REPORTED_TCB
changes the VCEK.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvmotion.abi.snp import PlatformInfo, Product, TcbVersion
from cvmotion.errors import AbiError, FirmwareError, FirmwareStatus, UsageError
from cvmotion.files import PRIVATE, read_json, write_atomic, write_json
from cvmotion.firmware.keys import SeededRandom, system_random
from cvmotion.firmware.vendor import Vendor

__all__ = ["CHIP_FILE", "TRUST_ANCHOR_FILE", "Chip", "Cpuid", "FirmwareVersion", "default_tcb"]

CHIP_FILE = "chip.json"
SECRET_FILE = "chip.secret"
TRUST_ANCHOR_FILE = "trust-anchor.pem"  # the emulated vendor ARK of this chip's product (PEM)
_FORMAT = 1


@dataclass(frozen=True, slots=True)
class FirmwareVersion:
    """SNP firmware version: API major.minor and build (report CURRENT_/COMMITTED_ MAJOR/MINOR/BUILD)."""

    major: int
    minor: int
    build: int

    def describe(self) -> str:
        return f"{self.major}.{self.minor} build {self.build}"

    def at_least(self, major: int, minor: int) -> bool:
        return (self.major, self.minor) >= (major, minor)


@dataclass(frozen=True, slots=True)
class Cpuid:
    """CPUID family/model/stepping as the report encodes them (combined extended+base values)."""

    family: int
    model: int
    stepping: int

    @property
    def fms(self) -> int:
        """CPUID Fn0000_0001_EAX layout (the secrets page FMS field): stepping, model, family, ext fields."""
        base_family = min(self.family, 0xF)
        ext_family = self.family - base_family
        return (
            (self.stepping & 0xF)
            | (self.model & 0xF) << 4
            | base_family << 8
            | (self.model >> 4) << 16
            | ext_family << 20
        )


# Plausible per-product defaults (Genoa's are the real genoa-v5 vector's; Milan stepping 0 = "Milan-B0").
_DEFAULTS: dict[Product, tuple[TcbVersion, FirmwareVersion, Cpuid]] = {
    Product.MILAN: (TcbVersion(4, 0, 22, 213), FirmwareVersion(1, 55, 21), Cpuid(0x19, 0x01, 0x00)),
    Product.GENOA: (TcbVersion(10, 0, 25, 84), FirmwareVersion(1, 55, 43), Cpuid(0x19, 0x11, 0x01)),
    Product.TURIN: (TcbVersion(1, 0, 2, 71, fmc=0), FirmwareVersion(1, 58, 3), Cpuid(0x1A, 0x02, 0x00)),
}  # (boot_loader, tee, snp, microcode): TcbVersion's field order
_PLATFORM_INFO = PlatformInfo.SMT_EN | PlatformInfo.ECC_EN | PlatformInfo.ALIAS_CHECK_COMPLETE


def default_tcb(product: Product) -> TcbVersion:
    return _DEFAULTS[product][0]


@dataclass(frozen=True, slots=True)
class Chip:
    """The persistent identity of one emulated chip. Immutable: updates return a new, saved ``Chip``."""

    data_dir: Path
    product: Product
    chip_id: bytes
    chip_secret: bytes = field(repr=False)
    current_tcb: TcbVersion
    committed_tcb: TcbVersion
    reported_tcb: TcbVersion
    firmware: FirmwareVersion
    committed_firmware: FirmwareVersion
    cpuid: Cpuid
    platform_info: PlatformInfo = _PLATFORM_INFO
    report_version: int = 3  # 3 by default; 5 fills the mitigation vectors
    mit_vector: int = 0  # CURRENT_MIT_VECTOR (report v5)
    vendor_dir: Path | None = None

    @property
    def hwid(self) -> bytes:
        """The VCEK hwID: the whole CHIP_ID, or its first 8 bytes on Turin."""
        return self.chip_id[: self.product.hwid_len]

    @classmethod
    def create(
        cls,
        data_dir: Path,
        vendor: Vendor,
        product: Product,
        seed: int | None = None,
        *,
        report_version: int = 3,
        mit_vector: int = 0,
    ) -> Chip:
        """Manufacture a chip: random (or seeded) CHIP_ID and secret, registered in the vendor's fuse DB."""
        data_dir = Path(data_dir)
        if (data_dir / CHIP_FILE).exists():
            raise UsageError(f"{data_dir} already holds a chip ({CHIP_FILE}); use it or pick another directory")
        if report_version not in (2, 3, 5):
            raise UsageError(f"report version {report_version} is not one this firmware emits (2, 3 or 5)")
        rng = system_random if seed is None else SeededRandom(seed, f"chip/{product.value}")
        chip_id = rng(64) if product is not Product.TURIN else rng(8) + bytes(56)
        secret = rng(32)
        tcb, firmware, cpuid = _DEFAULTS[product]
        chip = cls(
            data_dir=data_dir,
            product=product,
            chip_id=chip_id,
            chip_secret=secret,
            current_tcb=tcb,
            committed_tcb=tcb,
            reported_tcb=tcb,
            firmware=firmware,
            committed_firmware=firmware,
            cpuid=cpuid,
            report_version=report_version,
            mit_vector=mit_vector,
            vendor_dir=vendor.root.resolve(),
        )
        vendor.register_chip(product, chip_id, secret)
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(data_dir / SECRET_FILE, secret, mode=PRIVATE)
        # The maker's root, recorded at manufacturing: the emulated trust anchor this platform's migration agent
        # accepts next to AMD's pinned ARKs (never one a KDS or the host names later).
        write_atomic(data_dir / TRUST_ANCHOR_FILE, vendor.ark_path(product).read_bytes())
        chip.save()
        return chip

    @classmethod
    def load(cls, data_dir: Path) -> Chip:
        """Load the chip persisted in ``data_dir``; missing or corrupt files give a ``UsageError``."""
        data_dir = Path(data_dir)
        doc = read_json(data_dir / CHIP_FILE, "chip")
        try:
            secret = (data_dir / SECRET_FILE).read_bytes()
        except OSError as exc:
            raise UsageError(f"chip: cannot read {data_dir / SECRET_FILE}: {exc.strerror or exc}") from exc
        try:
            return _from_doc(data_dir, doc, secret)
        except (KeyError, TypeError, ValueError, AbiError) as exc:
            raise UsageError(f"chip: {data_dir / CHIP_FILE} is corrupt: {exc!r}") from exc

    def save(self) -> None:
        write_json(self.data_dir / CHIP_FILE, self.to_doc())

    def to_doc(self) -> dict[str, Any]:
        """The public description (no secret), as persisted and as ``platform show --json`` prints it."""
        layout = self.product.tcb_layout
        return {
            "format": _FORMAT,
            "emulated": True,
            "product": self.product.value,
            "chip_id": self.chip_id.hex(),
            "current_tcb": f"{self.current_tcb.to_u64(layout):#018x}",
            "committed_tcb": f"{self.committed_tcb.to_u64(layout):#018x}",
            "reported_tcb": f"{self.reported_tcb.to_u64(layout):#018x}",
            "firmware": dataclasses.asdict(self.firmware),
            "committed_firmware": dataclasses.asdict(self.committed_firmware),
            "cpuid": dataclasses.asdict(self.cpuid),
            "platform_info": int(self.platform_info),
            "report_version": self.report_version,
            "mit_vector": self.mit_vector,
            "vendor_dir": str(self.vendor_dir) if self.vendor_dir else None,
        }

    def set_tcb(self, current: TcbVersion, *, reported: TcbVersion | None = None, commit: bool = False) -> Chip:
        """Install firmware at ``current`` (a DOWNLOAD_FIRMWARE), optionally SNP_COMMIT it; saves the result.

        REPORTED_TCB follows CURRENT_TCB unless ``reported`` pins it lower (SNP_SET_CONFIG). Rolling back
        below COMMITTED_TCB is refused with BAD_SVN, as the real firmware refuses an older image.
        """
        layout = self.product.tcb_layout
        current.to_u64(layout)  # raises for values that do not fit the product's layout (fmc before Turin)
        if not current.dominates(self.committed_tcb):
            raise FirmwareError(
                FirmwareStatus.BAD_SVN,
                f"TCB {current.describe()} is below the committed TCB {self.committed_tcb.describe()}",
            )
        reported = current if reported is None else reported
        reported.to_u64(layout)
        if not current.dominates(reported):
            raise FirmwareError(FirmwareStatus.INVALID_PARAM, "REPORTED_TCB may not exceed CURRENT_TCB")
        committed = current if commit else self.committed_tcb
        chip = dataclasses.replace(
            self,
            current_tcb=current,
            reported_tcb=reported,
            committed_tcb=committed,
            committed_firmware=self.firmware if commit else self.committed_firmware,
        )
        chip.save()
        return chip


def _from_doc(data_dir: Path, doc: dict[str, Any], secret: bytes) -> Chip:
    if doc.get("format") != _FORMAT:
        raise ValueError(f"format {doc.get('format')!r} (expected {_FORMAT})")
    product = Product.from_name(str(doc["product"]))
    layout = product.tcb_layout
    if len(secret) != 32:
        raise ValueError("chip secret is not 32 bytes")

    def tcb(name: str) -> TcbVersion:
        return TcbVersion.from_u64(int(str(doc[name]), 16), layout)

    chip_id = bytes.fromhex(str(doc["chip_id"]))
    if len(chip_id) != 64:
        raise ValueError("chip_id is not 64 bytes")
    vendor_dir = doc.get("vendor_dir")
    return Chip(
        data_dir=data_dir,
        product=product,
        chip_id=chip_id,
        chip_secret=secret,
        current_tcb=tcb("current_tcb"),
        committed_tcb=tcb("committed_tcb"),
        reported_tcb=tcb("reported_tcb"),
        firmware=FirmwareVersion(**doc["firmware"]),
        committed_firmware=FirmwareVersion(**doc["committed_firmware"]),
        cpuid=Cpuid(**doc["cpuid"]),
        platform_info=PlatformInfo(int(doc["platform_info"])),
        report_version=int(doc["report_version"]),
        mit_vector=int(doc["mit_vector"]),
        vendor_dir=Path(vendor_dir) if vendor_dir else None,
    )
