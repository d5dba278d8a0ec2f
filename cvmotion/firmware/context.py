"""firmware layer: the guest context (GCTX) the emulated SP keeps per guest, and its byte serialization.

A guest context never leaves the SP in the clear: issue 4 moves it between chips inside the encrypted
immutable-state bundle, so it has a fixed, versioned layout (little-endian):

```
offset size  field                      offset size  field
0x000  8     MAGIC "CVMGCTX\\0"          0x090  48    ID_KEY_DIGEST
0x008  2     FORMAT_VERSION (1)          0x0C0  48    AUTHOR_KEY_DIGEST
0x00A  1     GUEST_STATE (GuestState)    0x0F0  16    FAMILY_ID
0x00B  1     OP_STATE (OpState)          0x100  16    IMAGE_ID
0x00C  4     FLAGS (ContextFlag)         0x110  32    REPORT_ID
0x010  1     PRODUCT (0 Milan 1 Genoa 2 Turin)  0x130  32    REPORT_ID_MA
0x011  7     reserved                    0x150  4x8   MSG_SEQNO0..3 (last sequence number used per VMPCK)
0x018  8     POLICY                      0x170  32    VMRK
0x020  4     GUEST_SVN                   0x190  4x32  VMPCK0..3
0x024  4     reserved                    0x210  16    GOSVW
0x028  8     LAUNCH_TCB (product layout) 0x220  32    reserved
0x030  8     LAUNCH_MIT_VECTOR
0x038  8     reserved
0x040  48    LAUNCH_DIGEST (MEASUREMENT)
0x070  32    HOST_DATA
```
Total 0x240 bytes. Reserved bytes must be zero; unknown flags are refused.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from cvmotion.abi._codec import require_len, zero_ranges
from cvmotion.abi.snp import GuestPolicy, Product, TcbVersion
from cvmotion.errors import MalformedStructure, UnsupportedVersion
from cvmotion.firmware.id_block import LaunchIdentity
from cvmotion.firmware.keys import RandomSource

__all__ = ["CONTEXT_SIZE", "ContextFlag", "GuestContext", "GuestState", "OpState"]

CONTEXT_MAGIC = b"CVMGCTX\0"
CONTEXT_FORMAT = 1
_LAYOUT = struct.Struct("<8sHBBIB7sQI4sQQ8s48s32s48s48s16s16s32s32s4Q32s128s16s32s")
CONTEXT_SIZE = 0x240
assert _LAYOUT.size == CONTEXT_SIZE  # module invariant
_PRODUCTS = (Product.MILAN, Product.GENOA, Product.TURIN)
_RESERVED = ((0x011, 0x018), (0x024, 0x028), (0x038, 0x040), (0x220, 0x240))


class GuestState(enum.IntEnum):
    """SNP guest states (SNP ABI, "Guest States"): LAUNCH after LAUNCH_START, RUNNING after LAUNCH_FINISH."""

    INIT = 0
    LAUNCH = 1
    RUNNING = 2


class OpState(enum.IntEnum):
    """Migration op-state (DESIGN section 6). Issue 2 only uses RUNNABLE; the values are the wire encoding."""

    RUNNABLE = 0
    LIVE_EXPORT = 1
    PAUSED_EXPORT = 2
    POST_EXPORT = 3
    MEMORY_IMPORT = 4
    STATE_IMPORT = 5
    POST_IMPORT = 6
    FAILED = 7


class ContextFlag(enum.IntFlag):
    ACTIVATED = 1 << 0  # SNP_ACTIVATE bound the guest to an ASID
    ID_BLOCK_EN = 1 << 1
    AUTHOR_KEY_EN = 1 << 2
    IMI_EN = 1 << 3  # launched with IMI (migration-agent) pages


_ALL_FLAGS = int(ContextFlag.ACTIVATED | ContextFlag.ID_BLOCK_EN | ContextFlag.AUTHOR_KEY_EN | ContextFlag.IMI_EN)


@dataclass(slots=True)
class GuestContext:
    """Mutable state of one guest inside the SP. Holds secrets: never handed to the host."""

    product: Product
    policy: GuestPolicy
    launch_tcb: TcbVersion
    vmpcks: list[bytes] = field(repr=False)
    vmrk: bytes = field(repr=False)
    report_id: bytes
    report_id_ma: bytes = b"\xff" * 32  # all 0xFF: no migration agent (SNP ABI, REPORT_ID_MA)
    state: GuestState = GuestState.LAUNCH
    op_state: OpState = OpState.RUNNABLE
    flags: ContextFlag = ContextFlag(0)
    launch_digest: bytes = bytes(48)
    host_data: bytes = bytes(32)
    identity: LaunchIdentity = field(default_factory=LaunchIdentity)
    msg_seqnos: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    launch_mit_vector: int = 0
    gosvw: bytes = bytes(16)

    @classmethod
    def new(
        cls,
        product: Product,
        policy: GuestPolicy,
        launch_tcb: TcbVersion,
        rng: RandomSource,
        *,
        launch_mit_vector: int = 0,
        gosvw: bytes = bytes(16),
    ) -> GuestContext:
        """A context in GSTATE_LAUNCH with fresh VMPCK0..3, VMRK and REPORT_ID (SNP_LAUNCH_START)."""
        return cls(
            product=product,
            policy=policy,
            launch_tcb=launch_tcb,
            vmpcks=[rng(32) for _ in range(4)],
            vmrk=rng(32),
            report_id=rng(32),
            launch_mit_vector=launch_mit_vector,
            gosvw=gosvw,
        )

    def to_bytes(self) -> bytes:
        """The versioned layout above (the plaintext of issue 4's immutable-state bundle)."""
        ident = self.identity
        flags = self.flags | (ContextFlag.AUTHOR_KEY_EN if ident.author_key_en else ContextFlag(0))
        return _LAYOUT.pack(
            CONTEXT_MAGIC,
            CONTEXT_FORMAT,
            self.state,
            self.op_state,
            flags,
            _PRODUCTS.index(self.product),
            b"",
            self.policy.to_u64(),
            ident.guest_svn,
            b"",
            self.launch_tcb.to_u64(self.product.tcb_layout),
            self.launch_mit_vector,
            b"",
            self.launch_digest,
            self.host_data,
            ident.id_key_digest,
            ident.author_key_digest,
            ident.family_id,
            ident.image_id,
            self.report_id,
            self.report_id_ma,
            *self.msg_seqnos,
            self.vmrk,
            b"".join(self.vmpcks),
            self.gosvw,
            b"",
        )

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> GuestContext:
        data = bytes(data)
        require_len("GUEST_CONTEXT", data, CONTEXT_SIZE)
        f = _LAYOUT.unpack(data)
        if f[0] != CONTEXT_MAGIC:
            raise MalformedStructure("GUEST_CONTEXT: bad magic at 0x0")
        if f[1] != CONTEXT_FORMAT:
            raise UnsupportedVersion(f"GUEST_CONTEXT format {f[1]} is not supported ({CONTEXT_FORMAT})")
        zero_ranges("GUEST_CONTEXT", data, _RESERVED)
        try:
            state, op_state, flags = GuestState(f[2]), OpState(f[3]), ContextFlag(f[4])
            product = _PRODUCTS[f[5]]
        except (ValueError, IndexError):
            raise MalformedStructure("GUEST_CONTEXT: bad state, op-state or product at 0xA..0x10") from None
        if f[4] & ~_ALL_FLAGS:
            raise MalformedStructure(f"GUEST_CONTEXT: unknown FLAGS {f[4]:#x} at 0xC")
        vmpcks = f[26]
        return cls(
            product=product,
            policy=GuestPolicy.from_u64(f[7]),
            launch_tcb=TcbVersion.from_u64(f[10], product.tcb_layout),
            vmpcks=[vmpcks[i * 32 : (i + 1) * 32] for i in range(4)],
            vmrk=f[25],
            report_id=f[19],
            report_id_ma=f[20],
            state=state,
            op_state=op_state,
            flags=flags & ~ContextFlag.AUTHOR_KEY_EN,
            launch_digest=f[13],
            host_data=f[14],
            identity=LaunchIdentity(
                family_id=f[17],
                image_id=f[18],
                guest_svn=f[8],
                id_key_digest=f[15],
                author_key_digest=f[16],
                author_key_en=bool(flags & ContextFlag.AUTHOR_KEY_EN),
            ),
            msg_seqnos=list(f[21:25]),
            launch_mit_vector=f[11],
            gosvw=f[27],
        )
