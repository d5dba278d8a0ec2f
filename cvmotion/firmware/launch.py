"""firmware layer: SNP launch measurement (PAGE_INFO chain), launch policy checks, secrets and CPUID pages.

The launch digest is the SNP ABI's PAGE_INFO hash chain (SNP ABI, "SNP_LAUNCH_UPDATE" and the PAGE_INFO
table): for each page the firmware hashes

```
offset size  field
0x00   48    DIGEST_CUR   the launch digest so far (starts at 48 zero bytes)
0x30   48    CONTENTS     SHA-384 of the page for NORMAL and VMSA pages; zero for the other types
0x60   2     LENGTH       0x70
0x62   1     PAGE_TYPE    PageType
0x63   1     IMI_PAGE     bit 0
0x64   1     VMPL3_PERMS
0x65   1     VMPL2_PERMS
0x66   1     VMPL1_PERMS
0x67   1     reserved
0x68   8     GPA          guest-physical address (VMSA pages: 0xFFFFFFFFF000, as KVM/QEMU record them)
```
and the new digest is SHA-384 of those 0x70 bytes.  ``sevsnpmeasure.gctx.GCTX`` computes the same chain;
the tests use it as an oracle.

The firmware never owns guest memory: pages arrive as caller buffers.  A SECRETS page buffer is filled
with the secrets page layout (that is how the paravisor learns VMPCK0); a ZERO page buffer, if given, is
zeroed; a CPUID page is checked.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Sequence

from cvmotion.abi.snp import GuestPolicy, PlatformInfo, PolicyFlag, Product
from cvmotion.errors import FirmwareError, FirmwareStatus, MalformedStructure

__all__ = [
    "PAGE_INFO_SIZE",
    "PAGE_SIZE",
    "SECRETS_PAGE_VERSION",
    "VMSA_GPA",
    "LaunchDigest",
    "PageType",
    "check_cpuid_page",
    "check_launch_policy",
    "page_info",
    "write_secrets_page",
]

PAGE_SIZE = 0x1000
PAGE_INFO_SIZE = 0x70
VMSA_GPA = 0xFFFFFFFFF000  # GPA (u64)-1, page aligned, bits 63:52 clear: how KVM records VMSA pages
LD_SIZE = 48
_PAGE_INFO = struct.Struct("<48s48sHBBBBBBQ")
assert _PAGE_INFO.size == PAGE_INFO_SIZE  # module invariant


class PageType(enum.IntEnum):
    """PAGE_TYPE of SNP_LAUNCH_UPDATE (SNP ABI, "Page Types")."""

    NORMAL = 0x01
    VMSA = 0x02
    ZERO = 0x03
    UNMEASURED = 0x04
    SECRETS = 0x05
    CPUID = 0x06


def page_info(
    digest_cur: bytes,
    contents: bytes,
    page_type: PageType,
    gpa: int,
    *,
    imi: bool = False,
    vmpl_perms: tuple[int, int, int] = (0, 0, 0),
) -> bytes:
    """The 0x70-byte PAGE_INFO structure that is hashed into the launch digest."""
    vmpl3, vmpl2, vmpl1 = vmpl_perms
    return _PAGE_INFO.pack(digest_cur, contents, PAGE_INFO_SIZE, page_type, int(imi), vmpl3, vmpl2, vmpl1, 0, gpa)


class LaunchDigest:
    """The running launch digest of one guest (SHA-384 chain over PAGE_INFO)."""

    def __init__(self, seed: bytes = bytes(LD_SIZE)) -> None:
        if len(seed) != LD_SIZE:
            raise MalformedStructure(f"launch digest must be {LD_SIZE} bytes")
        self._ld = seed

    @property
    def value(self) -> bytes:
        return self._ld

    def update(self, page_type: PageType, gpa: int, contents: bytes = bytes(LD_SIZE)) -> None:
        self._ld = hashlib.sha384(page_info(self._ld, contents, page_type, gpa)).digest()

    def measure(self, page_type: PageType, gpa: int, data: bytes | bytearray | memoryview | None) -> None:
        """Fold one page: NORMAL/VMSA hash the page's bytes, the other types contribute zero CONTENTS."""
        if page_type in (PageType.NORMAL, PageType.VMSA):
            if data is None or len(data) != PAGE_SIZE:
                raise FirmwareError(FirmwareStatus.INVALID_LENGTH, f"{page_type.name} page at {gpa:#x} needs 4 KiB")
            self.update(page_type, gpa, hashlib.sha384(data).digest())
        else:
            self.update(page_type, gpa)


# -- LAUNCH_START policy ---------------------------------------------------------------------------

_MILAN_LACKS = PolicyFlag.MEM_AES_256_XTS | PolicyFlag.CIPHERTEXT_HIDING | PolicyFlag.PAGE_SWAP_DISABLE


def check_launch_policy(
    raw_policy: int,
    *,
    product: Product,
    api_major: int,
    api_minor: int,
    platform_info: PlatformInfo,
) -> GuestPolicy:
    """SNP_LAUNCH_START's policy checks; every refusal is ``FirmwareError(POLICY_FAILURE)`` naming the rule.

    Rules (SNP ABI, "SNP_LAUNCH_START" and "Guest Policy"): bit 17 must be one and bits 63:26 zero; the
    requested ABI_MAJOR.ABI_MINOR may not exceed the firmware's; SMT=0 is refused when SMT is enabled on
    the platform; CIPHERTEXT_HIDING needs ciphertext hiding enabled; RAPL_DIS needs RAPL disabled;
    PAGE_SWAP_DISABLE needs ABI 1.58; features the product lacks (Milan: AES-256-XTS, ciphertext hiding)
    are refused.
    """
    try:
        policy = GuestPolicy.from_u64(raw_policy)
    except MalformedStructure as exc:
        raise FirmwareError(FirmwareStatus.POLICY_FAILURE, str(exc)) from exc
    flags = policy.flags
    problems: list[str] = []
    if (policy.abi_major, policy.abi_minor) > (api_major, api_minor):
        problems.append(
            f"policy requires ABI {policy.abi_major}.{policy.abi_minor}, firmware is {api_major}.{api_minor}"
        )
    if platform_info & PlatformInfo.SMT_EN and not flags & PolicyFlag.SMT:
        problems.append("SMT is enabled on the platform but the policy does not allow SMT (bit 16)")
    if flags & PolicyFlag.CIPHERTEXT_HIDING and not platform_info & PlatformInfo.CIPHERTEXT_HIDING_EN:
        problems.append("policy requires ciphertext hiding (bit 24), which is not enabled")
    if flags & PolicyFlag.RAPL_DIS and not platform_info & PlatformInfo.RAPL_DIS:
        problems.append("policy requires RAPL disabled (bit 23), but RAPL is enabled")
    if flags & PolicyFlag.PAGE_SWAP_DISABLE and (api_major, api_minor) < (1, 58):
        problems.append("PAGE_SWAP_DISABLE (bit 25) needs firmware ABI 1.58")
    if product is Product.MILAN and flags & _MILAN_LACKS:
        problems.append(f"Milan does not support {PolicyFlag(flags & _MILAN_LACKS)!r}")
    if problems:
        raise FirmwareError(FirmwareStatus.POLICY_FAILURE, "; ".join(problems))
    return policy


# -- SECRETS page ----------------------------------------------------------------------------------

SECRETS_PAGE_VERSION = 3  # layout with TSC_FACTOR at 0x160 (SNP ABI 1.55+, "Secrets Page Format")
_SECRETS_HEAD = struct.Struct("<III4s16s")  # VERSION, IMIEN, FMS, reserved, GOSVW


def write_secrets_page(
    buffer: bytearray | memoryview,
    *,
    vmpcks: Sequence[bytes],
    fms: int,
    imien: bool = False,
    gosvw: bytes = bytes(16),
    tsc_factor: int = 0,
) -> None:
    """Fill a caller buffer with the SNP secrets page (SNP ABI, "Secrets Page Format"; Linux ``snp_secrets_page``).

    ```
    0x000 VERSION u32 · 0x004 IMIEN (bit 0) · 0x008 FMS u32 · 0x00C reserved · 0x010 GOSVW[16]
    0x020 VMPCK0[32] · 0x040 VMPCK1 · 0x060 VMPCK2 · 0x080 VMPCK3
    0x0A0 GUEST_AREA_0[96] (zero) · 0x100 VMSA_TWEAK_BITMAP[64] (zero) · 0x140 GUEST_AREA_1[32] (zero)
    0x160 TSC_FACTOR u32 · 0x164.. reserved (zero)
    ```
    """
    if len(buffer) != PAGE_SIZE:
        raise FirmwareError(FirmwareStatus.INVALID_LENGTH, "a SECRETS page is 4 KiB")
    if len(vmpcks) != 4 or any(len(k) != 32 for k in vmpcks):
        raise MalformedStructure("the secrets page holds four 32-byte VMPCKs")
    page = bytearray(PAGE_SIZE)
    _SECRETS_HEAD.pack_into(page, 0, SECRETS_PAGE_VERSION, int(imien), fms, b"", gosvw)
    for i, key in enumerate(vmpcks):
        page[0x20 + 0x20 * i : 0x40 + 0x20 * i] = key
    struct.pack_into("<I", page, 0x160, tsc_factor)
    buffer[:] = page


# -- CPUID page ------------------------------------------------------------------------------------

CPUID_MAX_ENTRIES = 64
_CPUID_HEAD = struct.Struct("<I12s")  # COUNT, reserved
_CPUID_ENTRY = struct.Struct("<IIQQIIIIQ")  # EAX_IN ECX_IN XCR0_IN XSS_IN EAX EBX ECX EDX reserved
assert _CPUID_ENTRY.size == 0x30  # module invariant


def check_cpuid_page(data: bytes | bytearray | memoryview) -> int:
    """Validate the CPUID page's structure (SNP ABI, "CPUID Function Structure"); returns the entry count.

    The real firmware also filters each leaf against what the part supports and, on a mismatch, rewrites
    the page and fails with INVALID_PARAM.  The emulated part checks structure only (count, reserved
    bytes, tail zero); it has no CPUID policy table to filter with.
    """
    if len(data) != PAGE_SIZE:
        raise FirmwareError(FirmwareStatus.INVALID_LENGTH, "a CPUID page is 4 KiB")
    count, reserved = _CPUID_HEAD.unpack_from(data)
    if count > CPUID_MAX_ENTRIES:
        raise FirmwareError(FirmwareStatus.INVALID_PARAM, f"CPUID page COUNT {count} exceeds {CPUID_MAX_ENTRIES}")
    end = _CPUID_HEAD.size + count * _CPUID_ENTRY.size
    if any(reserved) or any(data[end:]):
        raise FirmwareError(FirmwareStatus.INVALID_PARAM, f"CPUID page: reserved bytes at {end:#x}.. must be zero")
    for i in range(count):
        if _CPUID_ENTRY.unpack_from(data, _CPUID_HEAD.size + i * _CPUID_ENTRY.size)[8]:
            offset = _CPUID_HEAD.size + i * _CPUID_ENTRY.size + 0x28
            raise FirmwareError(FirmwareStatus.INVALID_PARAM, f"CPUID page: reserved field at {offset:#x} not zero")
    return int(count)
