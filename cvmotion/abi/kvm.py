"""abi layer: the x86-64 KVM userspace ABI (linux/kvm.h, asm/kvm.h): ioctl numbers and ctypes layouts.

One table (``Ioctl``) holds every request number, computed from the ``_IO/_IOR/_IOW/_IOWR`` encoding of
``asm-generic/ioctl.h`` and the struct sizes below, the way rust-vmm's ``kvm_ioctls.rs`` lists them.
Every layout is ``_pack_ = 1`` with explicit padding fields, ``__slots__ = ()`` (a misspelt field name is
an error, not a silently created attribute) and a size pinned with ``require_size`` at import.  The unit
test ``tests/unit/vmm/test_abi_kvm.py`` compiles the real header and compares every number, size and
offset when gcc and the kernel headers are present.
"""

from __future__ import annotations

import ctypes
import enum

from cvmotion.abi._codec import require_size

__all__ = [
    "KVMIO",
    "KVM_API_VERSION",
    "KVM_CPUID_FLAG_SIGNIFCANT_INDEX",
    "KVM_DIRTY_LOG_INITIALLY_SET",
    "KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE",
    "KVM_MAX_CPUID_ENTRIES",
    "KVM_MEM_LOG_DIRTY_PAGES",
    "KVM_RUN_EXIT_OFFSET",
    "XSAVE_LEGACY_SIZE",
    "Cap",
    "ExitReason",
    "Ioctl",
    "IoDirection",
    "IrqchipId",
    "KvmClearDirtyLog",
    "KvmClockData",
    "KvmCpuid2Header",
    "KvmCpuidEntry2",
    "KvmDebugregs",
    "KvmDirtyLog",
    "KvmDtable",
    "KvmEnableCap",
    "KvmFpu",
    "KvmIrqchip",
    "KvmLapicState",
    "KvmMpState",
    "KvmMsrEntry",
    "KvmMsrsHeader",
    "KvmRegs",
    "KvmRunExitFailEntry",
    "KvmRunExitInternal",
    "KvmRunExitIo",
    "KvmRunExitMmio",
    "KvmRunExitSystemEvent",
    "KvmRunHeader",
    "KvmSegment",
    "KvmSregs",
    "KvmUserspaceMemoryRegion",
    "KvmVcpuEvents",
    "KvmXcr",
    "KvmXcrs",
    "MpState",
    "SystemEvent",
    "InternalErrorSuberror",
    "cpuid2_buffer",
    "msrs_buffer",
]

KVMIO = 0xAE
KVM_API_VERSION = 12  # the only stable API version ever released (Documentation/virt/kvm/api.rst 4.1)
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0  # sic: the kernel's spelling
KVM_MAX_CPUID_ENTRIES = 256
XSAVE_LEGACY_SIZE = 4096  # struct kvm_xsave; KVM_GET_XSAVE2 may need more (KVM_CAP_XSAVE2 says how much)

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    # asm-generic/ioctl.h: dir(2) << 30 | size(14) << 16 | type(8) << 8 | nr(8)
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


class _Struct(ctypes.LittleEndianStructure):
    _pack_ = 1
    __slots__ = ()


class KvmUserspaceMemoryRegion(_Struct):
    """struct kvm_userspace_memory_region (api.rst 4.35)."""

    __slots__ = ()

    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    ]


class KvmRegs(_Struct):
    """struct kvm_regs (asm/kvm.h)."""

    __slots__ = ()

    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
        )
    ]  # fmt: skip


class KvmSegment(_Struct):
    """struct kvm_segment: the hidden descriptor cache of a segment register."""

    __slots__ = ()

    _fields_ = [
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8),
        ("present", ctypes.c_uint8),
        ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8),
        ("s", ctypes.c_uint8),
        ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8),
        ("avl", ctypes.c_uint8),
        ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
    ]


class KvmDtable(_Struct):
    """struct kvm_dtable: GDTR/IDTR."""

    __slots__ = ()

    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16), ("padding", ctypes.c_uint16 * 3)]


class KvmSregs(_Struct):
    """struct kvm_sregs (asm/kvm.h)."""

    __slots__ = ()

    _fields_ = [
        *[(name, KvmSegment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")],
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        *[(name, ctypes.c_uint64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")],
        ("interrupt_bitmap", ctypes.c_uint64 * 4),
    ]


class KvmFpu(_Struct):
    """struct kvm_fpu: legacy x87/SSE state (superseded by xsave where KVM_CAP_XSAVE exists)."""

    __slots__ = ()

    _fields_ = [
        ("fpr", (ctypes.c_uint8 * 16) * 8),
        ("fcw", ctypes.c_uint16),
        ("fsw", ctypes.c_uint16),
        ("ftwx", ctypes.c_uint8),
        ("pad1", ctypes.c_uint8),
        ("last_opcode", ctypes.c_uint16),
        ("last_ip", ctypes.c_uint64),
        ("last_dp", ctypes.c_uint64),
        ("xmm", (ctypes.c_uint8 * 16) * 16),
        ("mxcsr", ctypes.c_uint32),
        ("pad2", ctypes.c_uint32),
    ]


class KvmXcr(_Struct):
    __slots__ = ()

    _fields_ = [("xcr", ctypes.c_uint32), ("reserved", ctypes.c_uint32), ("value", ctypes.c_uint64)]


class KvmXcrs(_Struct):
    """struct kvm_xcrs: XCR0 and friends."""

    __slots__ = ()

    _fields_ = [
        ("nr_xcrs", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("xcrs", KvmXcr * 16),
        ("padding", ctypes.c_uint64 * 16),
    ]


class KvmMsrEntry(_Struct):
    __slots__ = ()

    _fields_ = [("index", ctypes.c_uint32), ("reserved", ctypes.c_uint32), ("data", ctypes.c_uint64)]


class KvmMsrsHeader(_Struct):
    """struct kvm_msrs without its flexible ``entries[]`` (see ``msrs_buffer``)."""

    __slots__ = ()

    _fields_ = [("nmsrs", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class KvmLapicState(_Struct):
    """struct kvm_lapic_state: the 1 KiB local APIC register page."""

    __slots__ = ()

    _fields_ = [("regs", ctypes.c_uint8 * 1024)]


class KvmVcpuEvents(_Struct):
    """struct kvm_vcpu_events (api.rst 4.31): pending exception/interrupt/NMI/SMI state."""

    __slots__ = ()

    _fields_ = [
        ("exception_injected", ctypes.c_uint8),
        ("exception_nr", ctypes.c_uint8),
        ("exception_has_error_code", ctypes.c_uint8),
        ("exception_pending", ctypes.c_uint8),
        ("exception_error_code", ctypes.c_uint32),
        ("interrupt_injected", ctypes.c_uint8),
        ("interrupt_nr", ctypes.c_uint8),
        ("interrupt_soft", ctypes.c_uint8),
        ("interrupt_shadow", ctypes.c_uint8),
        ("nmi_injected", ctypes.c_uint8),
        ("nmi_pending", ctypes.c_uint8),
        ("nmi_masked", ctypes.c_uint8),
        ("nmi_pad", ctypes.c_uint8),
        ("sipi_vector", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("smi_smm", ctypes.c_uint8),
        ("smi_pending", ctypes.c_uint8),
        ("smi_smm_inside_nmi", ctypes.c_uint8),
        ("smi_latched_init", ctypes.c_uint8),
        ("triple_fault_pending", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8 * 26),
        ("exception_has_payload", ctypes.c_uint8),
        ("exception_payload", ctypes.c_uint64),
    ]


class KvmMpState(_Struct):
    __slots__ = ()

    _fields_ = [("mp_state", ctypes.c_uint32)]


class KvmDebugregs(_Struct):
    __slots__ = ()

    _fields_ = [
        ("db", ctypes.c_uint64 * 4),
        ("dr6", ctypes.c_uint64),
        ("dr7", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("reserved", ctypes.c_uint64 * 9),
    ]


class KvmClockData(_Struct):
    """struct kvm_clock_data: the VM's kvmclock (KVM_GET_CLOCK/KVM_SET_CLOCK)."""

    __slots__ = ()

    _fields_ = [
        ("clock", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("pad0", ctypes.c_uint32),
        ("realtime", ctypes.c_uint64),
        ("host_tsc", ctypes.c_uint64),
        ("pad", ctypes.c_uint32 * 4),
    ]


class KvmIrqchip(_Struct):
    """struct kvm_irqchip: one of PIC master, PIC slave, IOAPIC; the chip state is opaque 512 bytes."""

    __slots__ = ()

    _fields_ = [("chip_id", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("chip", ctypes.c_uint8 * 512)]


class KvmCpuidEntry2(_Struct):
    __slots__ = ()

    _fields_ = [
        ("function", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("eax", ctypes.c_uint32),
        ("ebx", ctypes.c_uint32),
        ("ecx", ctypes.c_uint32),
        ("edx", ctypes.c_uint32),
        ("padding", ctypes.c_uint32 * 3),
    ]


class KvmCpuid2Header(_Struct):
    """struct kvm_cpuid2 without its flexible ``entries[]`` (see ``cpuid2_buffer``)."""

    __slots__ = ()

    _fields_ = [("nent", ctypes.c_uint32), ("padding", ctypes.c_uint32)]


class KvmDirtyLog(_Struct):
    """struct kvm_dirty_log; ``dirty_bitmap`` is a user pointer (one bit per page of the slot)."""

    __slots__ = ()

    _fields_ = [("slot", ctypes.c_uint32), ("padding1", ctypes.c_uint32), ("dirty_bitmap", ctypes.c_uint64)]


class KvmClearDirtyLog(_Struct):
    """struct kvm_clear_dirty_log: clear (and re-protect) the set bits of a bitmap window of a slot."""

    __slots__ = ()

    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("num_pages", ctypes.c_uint32),
        ("first_page", ctypes.c_uint64),
        ("dirty_bitmap", ctypes.c_uint64),
    ]


class KvmEnableCap(_Struct):
    __slots__ = ()

    _fields_ = [
        ("cap", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("args", ctypes.c_uint64 * 4),
        ("pad", ctypes.c_uint8 * 64),
    ]


class KvmRunHeader(_Struct):
    """The fixed head of the mmap'ed ``struct kvm_run``; the exit union starts at ``KVM_RUN_EXIT_OFFSET``."""

    __slots__ = ()

    _fields_ = [
        ("request_interrupt_window", ctypes.c_uint8),
        ("immediate_exit", ctypes.c_uint8),
        ("padding1", ctypes.c_uint8 * 6),
        ("exit_reason", ctypes.c_uint32),
        ("ready_for_interrupt_injection", ctypes.c_uint8),
        ("if_flag", ctypes.c_uint8),
        ("flags", ctypes.c_uint16),
        ("cr8", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
    ]


KVM_RUN_EXIT_OFFSET = 0x20


class KvmRunExitIo(_Struct):
    """kvm_run.io: ``count`` items of ``size`` bytes at ``kvm_run + data_offset``."""

    __slots__ = ()

    _fields_ = [
        ("direction", ctypes.c_uint8),
        ("size", ctypes.c_uint8),
        ("port", ctypes.c_uint16),
        ("count", ctypes.c_uint32),
        ("data_offset", ctypes.c_uint64),
    ]


class KvmRunExitMmio(_Struct):
    __slots__ = ()

    _fields_ = [
        ("phys_addr", ctypes.c_uint64),
        ("data", ctypes.c_uint8 * 8),
        ("len", ctypes.c_uint32),
        ("is_write", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    ]


class KvmRunExitInternal(_Struct):
    __slots__ = ()

    _fields_ = [("suberror", ctypes.c_uint32), ("ndata", ctypes.c_uint32), ("data", ctypes.c_uint64 * 16)]


class KvmRunExitFailEntry(_Struct):
    __slots__ = ()

    _fields_ = [("hardware_entry_failure_reason", ctypes.c_uint64), ("cpu", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class KvmRunExitSystemEvent(_Struct):
    __slots__ = ()

    _fields_ = [("type", ctypes.c_uint32), ("ndata", ctypes.c_uint32), ("data", ctypes.c_uint64 * 16)]


for _cls, _size in (
    (KvmUserspaceMemoryRegion, 0x20),
    (KvmRegs, 0x90),
    (KvmSegment, 0x18),
    (KvmDtable, 0x10),
    (KvmSregs, 0x138),
    (KvmFpu, 0x1A0),
    (KvmXcrs, 0x188),
    (KvmMsrEntry, 0x10),
    (KvmMsrsHeader, 0x8),
    (KvmLapicState, 0x400),
    (KvmVcpuEvents, 0x40),
    (KvmMpState, 0x4),
    (KvmDebugregs, 0x80),
    (KvmClockData, 0x30),
    (KvmIrqchip, 0x208),
    (KvmCpuidEntry2, 0x28),
    (KvmCpuid2Header, 0x8),
    (KvmDirtyLog, 0x10),
    (KvmClearDirtyLog, 0x18),
    (KvmEnableCap, 0x68),
    (KvmRunHeader, KVM_RUN_EXIT_OFFSET),
    (KvmRunExitIo, 0x10),
    (KvmRunExitMmio, 0x18),
    (KvmRunExitInternal, 0x88),
    (KvmRunExitFailEntry, 0x10),
    (KvmRunExitSystemEvent, 0x88),
):
    require_size(_cls, _size)


def msrs_buffer(count: int) -> ctypes.Array[ctypes.c_uint8]:
    """A zeroed ``struct kvm_msrs`` with room for ``count`` entries."""
    return (ctypes.c_uint8 * (ctypes.sizeof(KvmMsrsHeader) + count * ctypes.sizeof(KvmMsrEntry)))()


def cpuid2_buffer(count: int) -> ctypes.Array[ctypes.c_uint8]:
    """A zeroed ``struct kvm_cpuid2`` with room for ``count`` entries."""
    return (ctypes.c_uint8 * (ctypes.sizeof(KvmCpuid2Header) + count * ctypes.sizeof(KvmCpuidEntry2)))()


class Ioctl(enum.IntEnum):
    """Every KVM request number cvmotion issues (linux/kvm.h)."""

    # system ioctls (/dev/kvm)
    KVM_GET_API_VERSION = _ioc(_IOC_NONE, 0x00, 0)
    KVM_CREATE_VM = _ioc(_IOC_NONE, 0x01, 0)
    KVM_GET_MSR_INDEX_LIST = _ioc(_IOC_READ | _IOC_WRITE, 0x02, 4)  # struct kvm_msr_list {u32 nmsrs}
    KVM_CHECK_EXTENSION = _ioc(_IOC_NONE, 0x03, 0)
    KVM_GET_VCPU_MMAP_SIZE = _ioc(_IOC_NONE, 0x04, 0)
    KVM_GET_SUPPORTED_CPUID = _ioc(_IOC_READ | _IOC_WRITE, 0x05, 8)
    # VM ioctls
    KVM_CREATE_VCPU = _ioc(_IOC_NONE, 0x41, 0)
    KVM_GET_DIRTY_LOG = _ioc(_IOC_WRITE, 0x42, 0x10)
    KVM_SET_USER_MEMORY_REGION = _ioc(_IOC_WRITE, 0x46, 0x20)
    KVM_SET_TSS_ADDR = _ioc(_IOC_NONE, 0x47, 0)
    KVM_CREATE_IRQCHIP = _ioc(_IOC_NONE, 0x60, 0)
    KVM_GET_IRQCHIP = _ioc(_IOC_READ | _IOC_WRITE, 0x62, 0x208)
    KVM_SET_IRQCHIP = _ioc(_IOC_READ, 0x63, 0x208)
    KVM_SET_CLOCK = _ioc(_IOC_WRITE, 0x7B, 0x30)
    KVM_GET_CLOCK = _ioc(_IOC_READ, 0x7C, 0x30)
    KVM_ENABLE_CAP = _ioc(_IOC_WRITE, 0xA3, 0x68)
    KVM_CLEAR_DIRTY_LOG = _ioc(_IOC_READ | _IOC_WRITE, 0xC0, 0x18)
    # vCPU ioctls
    KVM_RUN = _ioc(_IOC_NONE, 0x80, 0)
    KVM_GET_REGS = _ioc(_IOC_READ, 0x81, 0x90)
    KVM_SET_REGS = _ioc(_IOC_WRITE, 0x82, 0x90)
    KVM_GET_SREGS = _ioc(_IOC_READ, 0x83, 0x138)
    KVM_SET_SREGS = _ioc(_IOC_WRITE, 0x84, 0x138)
    KVM_GET_MSRS = _ioc(_IOC_READ | _IOC_WRITE, 0x88, 8)
    KVM_SET_MSRS = _ioc(_IOC_WRITE, 0x89, 8)
    KVM_GET_FPU = _ioc(_IOC_READ, 0x8C, 0x1A0)
    KVM_SET_FPU = _ioc(_IOC_WRITE, 0x8D, 0x1A0)
    KVM_GET_LAPIC = _ioc(_IOC_READ, 0x8E, 0x400)
    KVM_SET_LAPIC = _ioc(_IOC_WRITE, 0x8F, 0x400)
    KVM_SET_CPUID2 = _ioc(_IOC_WRITE, 0x90, 8)
    KVM_GET_CPUID2 = _ioc(_IOC_READ | _IOC_WRITE, 0x91, 8)
    KVM_GET_MP_STATE = _ioc(_IOC_READ, 0x98, 4)
    KVM_SET_MP_STATE = _ioc(_IOC_WRITE, 0x99, 4)
    KVM_GET_VCPU_EVENTS = _ioc(_IOC_READ, 0x9F, 0x40)
    KVM_SET_VCPU_EVENTS = _ioc(_IOC_WRITE, 0xA0, 0x40)
    KVM_GET_DEBUGREGS = _ioc(_IOC_READ, 0xA1, 0x80)
    KVM_SET_DEBUGREGS = _ioc(_IOC_WRITE, 0xA2, 0x80)
    KVM_SET_TSC_KHZ = _ioc(_IOC_NONE, 0xA2, 0)
    KVM_GET_TSC_KHZ = _ioc(_IOC_NONE, 0xA3, 0)
    KVM_GET_XSAVE = _ioc(_IOC_READ, 0xA4, XSAVE_LEGACY_SIZE)
    KVM_SET_XSAVE = _ioc(_IOC_WRITE, 0xA5, XSAVE_LEGACY_SIZE)
    KVM_GET_XCRS = _ioc(_IOC_READ, 0xA6, 0x188)
    KVM_SET_XCRS = _ioc(_IOC_WRITE, 0xA7, 0x188)
    KVM_GET_XSAVE2 = _ioc(_IOC_READ, 0xCF, XSAVE_LEGACY_SIZE)


class Cap(enum.IntEnum):
    """KVM_CHECK_EXTENSION / KVM_ENABLE_CAP capability numbers."""

    KVM_CAP_IRQCHIP = 0
    KVM_CAP_SET_TSS_ADDR = 4
    KVM_CAP_EXT_CPUID = 7
    KVM_CAP_NR_VCPUS = 9
    KVM_CAP_NR_MEMSLOTS = 10
    KVM_CAP_MP_STATE = 14
    KVM_CAP_ADJUST_CLOCK = 39
    KVM_CAP_VCPU_EVENTS = 41
    KVM_CAP_DEBUGREGS = 50
    KVM_CAP_XSAVE = 55
    KVM_CAP_XCRS = 56
    KVM_CAP_GET_TSC_KHZ = 61
    KVM_CAP_MAX_VCPUS = 66
    KVM_CAP_IMMEDIATE_EXIT = 136
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
    KVM_CAP_XSAVE2 = 208


class ExitReason(enum.IntEnum):
    """kvm_run.exit_reason values cvmotion handles (linux/kvm.h KVM_EXIT_*)."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24
    IOAPIC_EOI = 26
    DIRTY_RING_FULL = 31
    NOTIFY = 37


class IoDirection(enum.IntEnum):
    IN = 0
    OUT = 1


class InternalErrorSuberror(enum.IntEnum):
    EMULATION = 1
    SIMUL_EX = 2
    DELIVERY_EV = 3
    UNEXPECTED_EXIT_REASON = 4


class SystemEvent(enum.IntEnum):
    SHUTDOWN = 1
    RESET = 2
    CRASH = 3
    WAKEUP = 4
    SUSPEND = 5
    SEV_TERM = 6


class MpState(enum.IntEnum):
    RUNNABLE = 0
    UNINITIALIZED = 1
    INIT_RECEIVED = 2
    HALTED = 3
    SIPI_RECEIVED = 4
    STOPPED = 5
    CHECK_STOP = 6
    OPERATING = 7
    LOAD = 8
    AP_RESET_HOLD = 9
    SUSPENDED = 10


class IrqchipId(enum.IntEnum):
    """kvm_irqchip.chip_id: the in-kernel PC interrupt controllers (KVM_IRQCHIP_*)."""

    PIC_MASTER = 0
    PIC_SLAVE = 1
    IOAPIC = 2
