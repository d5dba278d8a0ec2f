"""abi layer: the SEV-SNP attestation report and the values inside it (TCB, guest policy, platform/key info).

Implements the ATTESTATION_REPORT structure of the SEV-SNP Firmware ABI specification (AMD pub. 56860,
"ATTESTATION_REPORT Structure" table) for report versions 2, 3, 4 and 5, and the TCB_VERSION layouts of
pre-Turin (Milan, Genoa) and Turin parts.  See ``../shared/specs/snp/report_layout.csv`` for the offsets.

Parsing checks, in order: length, version range, must-be-zero ranges (which depend on the version), then
field values (policy bit 17, signing-key selector).  ``to_bytes`` is the exact inverse: for any report
``r``, ``AttestationReport.from_bytes(r.to_bytes()) == r`` and for any accepted buffer ``b``,
``AttestationReport.from_bytes(b).to_bytes() == b``.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from dataclasses import dataclass

from cvmotion.abi._codec import require_len, require_zero, zero_ranges
from cvmotion.errors import MalformedStructure, ReservedNotZero, UnsupportedVersion

__all__ = [
    "ECDSA_P384_SHA384",
    "REPORT_SIZE",
    "SIGNED_LEN",
    "SUPPORTED_REPORT_VERSIONS",
    "AttestationReport",
    "GuestPolicy",
    "KeyInfo",
    "PlatformInfo",
    "PolicyFlag",
    "Product",
    "SigningKey",
    "TcbLayout",
    "TcbVersion",
]

REPORT_SIZE = 0x4A0
SIGNED_LEN = 0x2A0  # the signature covers report bytes 0x000-0x29F (SNP ABI, ATTESTATION_REPORT)
SUPPORTED_REPORT_VERSIONS = frozenset({2, 3, 4, 5})
ECDSA_P384_SHA384 = 1  # SIGNATURE_ALGO value (SNP ABI, "Signature Algorithm Encodings")
_SIG_COMPONENT = 72  # R and S are 72-byte little-endian fields; P-384 uses the low 48 bytes
_P384_LEN = 48


class TcbLayout(enum.Enum):
    """Which TCB_VERSION byte layout a product uses (SNP ABI, TCB_VERSION; specs/snp/tcb_version.csv)."""

    PRE_TURIN = "pre-turin"  # BOOT_LOADER, TEE, rsvd x4, SNP, MICROCODE
    TURIN = "turin"  # FMC, BOOT_LOADER, TEE, SNP, rsvd x3, MICROCODE


class Product(enum.Enum):
    """EPYC generations with SEV-SNP. The value is the KDS product name (``/vcek/v1/{product}/...``)."""

    MILAN = "Milan"
    GENOA = "Genoa"
    TURIN = "Turin"

    @property
    def tcb_layout(self) -> TcbLayout:
        return TcbLayout.TURIN if self is Product.TURIN else TcbLayout.PRE_TURIN

    @property
    def hwid_len(self) -> int:
        """Bytes of CHIP_ID that identify the chip (the VCEK hwID): Turin uses only the first 8."""
        return 8 if self is Product.TURIN else 64

    @property
    def cpuid_family(self) -> int:
        return 0x1A if self is Product.TURIN else 0x19

    @classmethod
    def from_name(cls, name: str) -> Product:
        """Accept KDS names and VCEK productName values such as ``Milan-B0`` or ``Genoa-B1``."""
        base = name.strip().split("-", 1)[0].lower()
        for product in cls:
            if product.value.lower() == base:
                return product
        raise MalformedStructure(f"unknown SEV-SNP product name {name!r} (expected Milan, Genoa or Turin)")

    @classmethod
    def from_cpuid(cls, family: int, model: int) -> Product | None:
        """Product from the report's CPUID_FAM_ID / CPUID_MOD_ID (v3+); None when unknown or absent."""
        if family == 0x19:
            if model <= 0x0F:
                return cls.MILAN
            if 0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF:
                return cls.GENOA
        elif family == 0x1A and model <= 0x11:
            return cls.TURIN
        return None


@dataclass(frozen=True, slots=True)
class TcbVersion:
    """Security patch levels of the firmware components (SNP ABI, TCB_VERSION). ``fmc`` exists on Turin."""

    boot_loader: int = 0
    tee: int = 0
    snp: int = 0
    microcode: int = 0
    fmc: int = 0

    @classmethod
    def from_u64(cls, raw: int, layout: TcbLayout) -> TcbVersion:
        """Decode a raw little-endian u64; reserved bytes must be zero."""
        if not 0 <= raw < 1 << 64:
            raise MalformedStructure(f"TCB_VERSION {raw:#x} does not fit in 64 bits")
        b = raw.to_bytes(8, "little")
        if layout is TcbLayout.TURIN:
            require_zero("TCB_VERSION (Turin)", b, 4, 7)
            return cls(fmc=b[0], boot_loader=b[1], tee=b[2], snp=b[3], microcode=b[7])
        require_zero("TCB_VERSION", b, 2, 6)
        return cls(boot_loader=b[0], tee=b[1], snp=b[6], microcode=b[7])

    def to_u64(self, layout: TcbLayout) -> int:
        for name in ("boot_loader", "tee", "snp", "microcode", "fmc"):
            value = getattr(self, name)
            if not 0 <= value <= 0xFF:
                raise MalformedStructure(f"TCB_VERSION.{name} = {value} does not fit in one byte")
        if layout is TcbLayout.TURIN:
            b = bytes([self.fmc, self.boot_loader, self.tee, self.snp, 0, 0, 0, self.microcode])
        else:
            if self.fmc:
                raise MalformedStructure("TCB_VERSION.fmc exists only in the Turin layout")
            b = bytes([self.boot_loader, self.tee, 0, 0, 0, 0, self.snp, self.microcode])
        return int.from_bytes(b, "little")

    def dominates(self, other: TcbVersion) -> bool:
        """True when every component is at least ``other``'s (how a minimum TCB is checked)."""
        return (
            self.boot_loader >= other.boot_loader
            and self.tee >= other.tee
            and self.snp >= other.snp
            and self.microcode >= other.microcode
            and self.fmc >= other.fmc
        )

    def describe(self) -> str:
        text = f"bl={self.boot_loader} tee={self.tee} snp={self.snp} ucode={self.microcode}"
        return f"fmc={self.fmc} {text}" if self.fmc else text


class PolicyFlag(enum.IntFlag):
    """Single-bit fields of the guest POLICY (SNP ABI, "Guest Policy Structure")."""

    SMT = 1 << 16
    RESERVED_MBO = 1 << 17  # reserved, must be one
    MIGRATE_MA = 1 << 18
    DEBUG = 1 << 19
    SINGLE_SOCKET = 1 << 20
    CXL_ALLOW = 1 << 21
    MEM_AES_256_XTS = 1 << 22
    RAPL_DIS = 1 << 23
    CIPHERTEXT_HIDING = 1 << 24
    PAGE_SWAP_DISABLE = 1 << 25  # SNP ABI 1.58 (report v5)


_POLICY_MBZ_MASK = ~((1 << 26) - 1) & ((1 << 64) - 1)  # bits 63:26 must be zero


@dataclass(frozen=True, slots=True)
class GuestPolicy:
    """The 64-bit guest policy: minimum ABI version and the flag bits."""

    abi_minor: int = 0
    abi_major: int = 0
    flags: PolicyFlag = PolicyFlag.RESERVED_MBO

    @classmethod
    def from_u64(cls, raw: int) -> GuestPolicy:
        if not 0 <= raw < 1 << 64:
            raise MalformedStructure(f"POLICY {raw:#x} does not fit in 64 bits")
        if raw & _POLICY_MBZ_MASK:
            raise MalformedStructure(f"POLICY {raw:#018x}: bits 63:26 are reserved and must be zero")
        if not raw & PolicyFlag.RESERVED_MBO:
            raise MalformedStructure(f"POLICY {raw:#018x}: bit 17 is reserved and must be one")
        return cls(abi_minor=raw & 0xFF, abi_major=(raw >> 8) & 0xFF, flags=PolicyFlag(raw & ~0xFFFF))

    def to_u64(self) -> int:
        if not (0 <= self.abi_minor <= 0xFF and 0 <= self.abi_major <= 0xFF):
            raise MalformedStructure("POLICY ABI_MAJOR/ABI_MINOR must each fit in one byte")
        return int(self.flags) | (self.abi_major << 8) | self.abi_minor

    @property
    def debug(self) -> bool:
        return bool(self.flags & PolicyFlag.DEBUG)

    @property
    def migrate_ma(self) -> bool:
        return bool(self.flags & PolicyFlag.MIGRATE_MA)


class PlatformInfo(enum.IntFlag):
    """PLATFORM_INFO bits (SNP ABI, report offset 0x40). Bits 63:8 are reserved (not must-be-zero)."""

    SMT_EN = 1 << 0
    TSME_EN = 1 << 1
    ECC_EN = 1 << 2
    RAPL_DIS = 1 << 3
    CIPHERTEXT_HIDING_EN = 1 << 4
    ALIAS_CHECK_COMPLETE = 1 << 5
    RESERVED_6 = 1 << 6  # set on real Turin parts; named IOMMU_WRITE_SAFE by some verifiers
    SEV_TIO_EN = 1 << 7


class SigningKey(enum.IntEnum):
    """KEY_INFO.SIGNING_KEY: which key signed the report (SNP ABI, report offset 0x48 bits 4:2)."""

    VCEK = 0
    VLEK = 1
    NONE = 7


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """KEY_INFO: author-key flag, chip-key masking and the signing-key selector; bits 31:5 must be zero."""

    author_key_en: bool = False
    mask_chip_key: bool = False
    signing_key: SigningKey = SigningKey.VCEK

    @classmethod
    def from_u32(cls, raw: int) -> KeyInfo:
        if raw >> 5:
            raise MalformedStructure(f"KEY_INFO {raw:#x}: bits 31:5 are reserved and must be zero")
        selector = (raw >> 2) & 0x7
        try:
            signing_key = SigningKey(selector)
        except ValueError:
            raise MalformedStructure(f"KEY_INFO.SIGNING_KEY {selector} is reserved (0 VCEK, 1 VLEK, 7 none)") from None
        return cls(author_key_en=bool(raw & 1), mask_chip_key=bool(raw & 2), signing_key=signing_key)

    def to_u32(self) -> int:
        return int(self.author_key_en) | int(self.mask_chip_key) << 1 | int(self.signing_key) << 2


# One struct for the whole 0x4A0 bytes; the version decides which ranges are fields and which are MBZ.
_LAYOUT = struct.Struct(
    "<IIQ16s16sIIQQII"  # 0x000..0x050
    "64s48s32s48s48s32s32s"  # 0x050..0x180
    "QBBB21s64sQ"  # 0x180..0x1E8
    "BBBBBBBB"  # 0x1E8..0x1F0 firmware versions and two reserved bytes
    "QQQ152s"  # 0x1F0..0x2A0
    "72s72s368s"  # 0x2A0..0x4A0 signature
)
assert _LAYOUT.size == REPORT_SIZE  # a module invariant, not input validation


@dataclass(frozen=True, slots=True)
class AttestationReport:
    """A parsed, *unverified* attestation report. Field names follow the spec in snake_case.

    TCB fields hold the raw u64: their meaning depends on the product (``tcb()`` decodes them).
    ``signature_r``/``signature_s`` are the ECDSA P-384 integers.
    """

    version: int
    guest_svn: int
    policy: GuestPolicy
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: int
    platform_info: PlatformInfo
    key_info: KeyInfo
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: int
    chip_id: bytes
    committed_tcb: int
    current_build: int
    current_minor: int
    current_major: int
    committed_build: int
    committed_minor: int
    committed_major: int
    launch_tcb: int
    cpuid_fam_id: int = 0
    cpuid_mod_id: int = 0
    cpuid_step: int = 0
    launch_mit_vector: int = 0
    current_mit_vector: int = 0
    signature_r: int = 0
    signature_s: int = 0

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> AttestationReport:
        """Parse an unverified report. Raises only ``AbiError`` subclasses."""
        data = bytes(data)
        require_len("ATTESTATION_REPORT", data, REPORT_SIZE)
        version = int.from_bytes(data[0:4], "little")
        if version not in SUPPORTED_REPORT_VERSIONS:
            raise UnsupportedVersion(f"ATTESTATION_REPORT.VERSION {version} is not supported (2, 3, 4 or 5)")
        name = f"ATTESTATION_REPORT v{version}"
        zero_ranges(name, data, ((0x04C, 0x050), (0x1EB, 0x1EC), (0x1EF, 0x1F0), (0x330, 0x4A0)))
        zero_ranges(name, data, (((0x188 if version == 2 else 0x18B), 0x1A0),))
        zero_ranges(name, data, (((0x208 if version >= 5 else 0x1F8), 0x2A0),))
        # R and S are 72-byte little-endian fields of which P-384 uses the low 48 bytes.
        zero_ranges(name, data, ((0x2A0 + _P384_LEN, 0x2E8), (0x2E8 + _P384_LEN, 0x330)))
        f = _LAYOUT.unpack(data)
        return cls(
            version=f[0],
            guest_svn=f[1],
            policy=GuestPolicy.from_u64(f[2]),
            family_id=f[3],
            image_id=f[4],
            vmpl=f[5],
            signature_algo=f[6],
            current_tcb=f[7],
            platform_info=PlatformInfo(f[8]),
            key_info=KeyInfo.from_u32(f[9]),
            report_data=f[11],
            measurement=f[12],
            host_data=f[13],
            id_key_digest=f[14],
            author_key_digest=f[15],
            report_id=f[16],
            report_id_ma=f[17],
            reported_tcb=f[18],
            cpuid_fam_id=f[19],
            cpuid_mod_id=f[20],
            cpuid_step=f[21],
            chip_id=f[23],
            committed_tcb=f[24],
            current_build=f[25],
            current_minor=f[26],
            current_major=f[27],
            committed_build=f[29],
            committed_minor=f[30],
            committed_major=f[31],
            launch_tcb=f[33],
            launch_mit_vector=f[34],
            current_mit_vector=f[35],
            signature_r=int.from_bytes(f[37], "little"),
            signature_s=int.from_bytes(f[38], "little"),
        )

    def to_bytes(self) -> bytes:
        """Serialize; the exact inverse of ``from_bytes``. Raises ``AbiError`` for impossible values."""
        if self.version not in SUPPORTED_REPORT_VERSIONS:
            raise UnsupportedVersion(f"ATTESTATION_REPORT.VERSION {self.version} is not supported")
        if self.version == 2 and (self.cpuid_fam_id or self.cpuid_mod_id or self.cpuid_step):
            raise ReservedNotZero("ATTESTATION_REPORT v2", 0x188, 0x1A0)
        if self.version < 5 and (self.launch_mit_vector or self.current_mit_vector):
            raise ReservedNotZero(f"ATTESTATION_REPORT v{self.version}", 0x1F8, 0x2A0)
        for name, value in (("signature_r", self.signature_r), ("signature_s", self.signature_s)):
            if not 0 <= value < 1 << (8 * _P384_LEN):
                raise MalformedStructure(f"ATTESTATION_REPORT.{name} does not fit in 48 bytes")
        try:
            return _LAYOUT.pack(
                self.version,
                self.guest_svn,
                self.policy.to_u64(),
                self.family_id,
                self.image_id,
                self.vmpl,
                self.signature_algo,
                self.current_tcb,
                int(self.platform_info),
                self.key_info.to_u32(),
                0,
                self.report_data,
                self.measurement,
                self.host_data,
                self.id_key_digest,
                self.author_key_digest,
                self.report_id,
                self.report_id_ma,
                self.reported_tcb,
                self.cpuid_fam_id,
                self.cpuid_mod_id,
                self.cpuid_step,
                b"",
                self.chip_id,
                self.committed_tcb,
                self.current_build,
                self.current_minor,
                self.current_major,
                0,
                self.committed_build,
                self.committed_minor,
                self.committed_major,
                0,
                self.launch_tcb,
                self.launch_mit_vector,
                self.current_mit_vector,
                b"",
                self.signature_r.to_bytes(_SIG_COMPONENT, "little"),
                self.signature_s.to_bytes(_SIG_COMPONENT, "little"),
                b"",
            )
        except struct.error as exc:
            raise MalformedStructure(f"ATTESTATION_REPORT field out of range: {exc}") from exc

    def _check_sizes(self) -> None:
        sizes = {
            "family_id": 16,
            "image_id": 16,
            "report_data": 64,
            "measurement": 48,
            "host_data": 32,
            "id_key_digest": 48,
            "author_key_digest": 48,
            "report_id": 32,
            "report_id_ma": 32,
            "chip_id": 64,
        }
        for name, size in sizes.items():
            if len(getattr(self, name)) != size:
                raise MalformedStructure(f"ATTESTATION_REPORT.{name} must be {size} bytes")

    def __post_init__(self) -> None:
        # struct.pack would silently pad or truncate byte fields; refuse wrong sizes at construction.
        self._check_sizes()

    @property
    def signed_bytes(self) -> bytes:
        """The bytes the signature covers: report[0x000:0x2A0]."""
        return self.to_bytes()[:SIGNED_LEN]

    def replace(self, **changes: object) -> AttestationReport:
        """A copy with some fields changed (used by the firmware to fill in the signature)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @property
    def cpuid_product(self) -> Product | None:
        """The product named by the CPUID fields (v3+), or None for v2 and unknown parts."""
        if self.version < 3:
            return None
        return Product.from_cpuid(self.cpuid_fam_id, self.cpuid_mod_id)

    def tcb(self, raw: int, product: Product) -> TcbVersion:
        """Decode one of the TCB fields (``current_tcb``, ``reported_tcb``, ...) for ``product``."""
        return TcbVersion.from_u64(raw, product.tcb_layout)
