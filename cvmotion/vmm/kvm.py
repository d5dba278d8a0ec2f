"""vmm layer: thin typed wrappers over the three KVM file descriptors -- one class per fd (rust-vmm kvm-ioctls).

``Kvm`` (/dev/kvm), ``VmFd`` (KVM_CREATE_VM) and ``VcpuFd`` (KVM_CREATE_VCPU) issue ioctls through
ctypes' ``libc.ioctl``: a ctypes foreign call releases the GIL, so a vCPU thread blocked in ``KVM_RUN``
does not stall the rest of the VMM.  Every failure becomes ``KvmError(ioctl name, errno)``.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from cvmotion.abi import kvm as abi
from cvmotion.errors import KvmError

__all__ = ["Kvm", "VcpuFd", "VmFd", "kvm_usable"]

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_ioctl.restype = ctypes.c_int

S = TypeVar("S", bound=ctypes.Structure)
_MSR_ENTRY = np.dtype([("index", "<u4"), ("reserved", "<u4"), ("data", "<u8")])  # struct kvm_msr_entry


def _call(fd: int, request: abi.Ioctl, arg: int = 0) -> int:
    ret: int = _ioctl(fd, request.value, arg)
    if ret < 0:
        err = ctypes.get_errno()
        raise KvmError(request.name, err, os.strerror(err))
    return ret


def _get(fd: int, request: abi.Ioctl, cls: type[S]) -> S:
    value = cls()
    _call(fd, request, ctypes.addressof(value))
    return value


def _set(fd: int, request: abi.Ioctl, value: ctypes.Structure | ctypes.Array[ctypes.c_uint8]) -> None:
    _call(fd, request, ctypes.addressof(value))


class Kvm:
    """The system fd: capabilities, supported CPUID and MSRs, VM creation."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KvmError("open", exc.errno or 0, f"{path}: {exc.strerror}") from exc
        version = _call(self.fd, abi.Ioctl.KVM_GET_API_VERSION)
        if version != abi.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmError("KVM_GET_API_VERSION", 0, f"API version {version}, need {abi.KVM_API_VERSION}")

    def check_extension(self, cap: abi.Cap) -> int:
        return _call(self.fd, abi.Ioctl.KVM_CHECK_EXTENSION, cap.value)

    def vcpu_mmap_size(self) -> int:
        return _call(self.fd, abi.Ioctl.KVM_GET_VCPU_MMAP_SIZE)

    def supported_cpuid(self) -> list[abi.KvmCpuidEntry2]:
        buf = abi.cpuid2_buffer(abi.KVM_MAX_CPUID_ENTRIES)
        abi.KvmCpuid2Header.from_buffer(buf).nent = abi.KVM_MAX_CPUID_ENTRIES
        _call(self.fd, abi.Ioctl.KVM_GET_SUPPORTED_CPUID, ctypes.addressof(buf))
        count = abi.KvmCpuid2Header.from_buffer(buf).nent
        base = ctypes.sizeof(abi.KvmCpuid2Header)
        size = ctypes.sizeof(abi.KvmCpuidEntry2)
        return [abi.KvmCpuidEntry2.from_buffer_copy(buf, base + i * size) for i in range(count)]

    def msr_index_list(self) -> list[int]:
        """MSRs KVM saves/restores for migration (KVM_GET_MSR_INDEX_LIST, api.rst 4.3)."""
        count = 1024
        buf = (ctypes.c_uint32 * (1 + count))()
        buf[0] = count
        _call(self.fd, abi.Ioctl.KVM_GET_MSR_INDEX_LIST, ctypes.addressof(buf))
        return [buf[1 + i] for i in range(buf[0])]

    def create_vm(self) -> VmFd:
        return VmFd(_call(self.fd, abi.Ioctl.KVM_CREATE_VM, 0), self)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def kvm_usable(path: str = "/dev/kvm") -> tuple[bool, str]:
    """Whether KVM can run a VM here: the device opens, speaks API 12 and creates a VM."""
    try:
        kvm = Kvm(path)
    except KvmError as exc:
        return False, str(exc)
    try:
        vm = kvm.create_vm()
        vm.close()
        missing = [
            c.name
            for c in (
                abi.Cap.KVM_CAP_IRQCHIP,
                abi.Cap.KVM_CAP_IMMEDIATE_EXIT,
                abi.Cap.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            )
            if not kvm.check_extension(c)
        ]
        if missing:
            return False, f"KVM lacks {', '.join(missing)}"
        return True, "ok"
    except KvmError as exc:
        return False, str(exc)
    finally:
        kvm.close()


class VmFd:
    """A VM fd: memory slots, vCPUs, in-kernel irqchip, kvmclock, dirty log."""

    def __init__(self, fd: int, kvm: Kvm) -> None:
        self.fd = fd
        self.kvm = kvm

    def create_vcpu(self, index: int) -> VcpuFd:
        return VcpuFd(_call(self.fd, abi.Ioctl.KVM_CREATE_VCPU, index), index, self.kvm.vcpu_mmap_size())

    def set_user_memory_region(self, slot: int, flags: int, gpa: int, size: int, hva: int) -> None:
        region = abi.KvmUserspaceMemoryRegion(
            slot=slot, flags=flags, guest_phys_addr=gpa, memory_size=size, userspace_addr=hva
        )
        _set(self.fd, abi.Ioctl.KVM_SET_USER_MEMORY_REGION, region)

    def set_tss_addr(self, gpa: int) -> None:
        _call(self.fd, abi.Ioctl.KVM_SET_TSS_ADDR, gpa)

    def create_irqchip(self) -> None:
        _call(self.fd, abi.Ioctl.KVM_CREATE_IRQCHIP)

    def enable_cap(self, cap: abi.Cap, *args: int) -> None:
        value = abi.KvmEnableCap(cap=cap.value)
        for i, arg in enumerate(args):
            value.args[i] = arg
        _set(self.fd, abi.Ioctl.KVM_ENABLE_CAP, value)

    def get_irqchip(self, chip: abi.IrqchipId) -> bytes:
        value = abi.KvmIrqchip(chip_id=chip.value)
        _call(self.fd, abi.Ioctl.KVM_GET_IRQCHIP, ctypes.addressof(value))
        return bytes(value)

    def set_irqchip(self, data: bytes) -> None:
        _set(self.fd, abi.Ioctl.KVM_SET_IRQCHIP, abi.KvmIrqchip.from_buffer_copy(data))

    def get_clock(self) -> abi.KvmClockData:
        return _get(self.fd, abi.Ioctl.KVM_GET_CLOCK, abi.KvmClockData)

    def set_clock(self, clock: abi.KvmClockData) -> None:
        _set(self.fd, abi.Ioctl.KVM_SET_CLOCK, clock)

    def get_dirty_log(self, slot: int, bitmap: npt.NDArray[np.uint64]) -> None:
        # ABI: KVM writes ceil(npages / 64) longs through this pointer during the ioctl only.
        log = abi.KvmDirtyLog(slot=slot, dirty_bitmap=bitmap.ctypes.data)
        _set(self.fd, abi.Ioctl.KVM_GET_DIRTY_LOG, log)

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: npt.NDArray[np.uint64]) -> None:
        # ABI: first_page and num_pages must be multiples of 64 unless the window ends at the slot end.
        log = abi.KvmClearDirtyLog(
            slot=slot, num_pages=num_pages, first_page=first_page, dirty_bitmap=bitmap.ctypes.data
        )
        _set(self.fd, abi.Ioctl.KVM_CLEAR_DIRTY_LOG, log)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class VcpuFd:
    """A vCPU fd and its mmap'ed ``struct kvm_run``."""

    def __init__(self, fd: int, index: int, mmap_size: int) -> None:
        self.fd = fd
        self.index = index
        # ABI: kvm_run is shared with the kernel for the vCPU's lifetime; the views below alias it, so the
        # mapping is closed only after they are dropped (close()).
        self._run_map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_header: abi.KvmRunHeader | None = abi.KvmRunHeader.from_buffer(self._run_map)
        self.run_base = ctypes.addressof(self.run_header)

    def run(self) -> int:
        """One KVM_RUN; returns 0 or the errno (EINTR when kicked or on ``immediate_exit``)."""
        ret: int = _ioctl(self.fd, abi.Ioctl.KVM_RUN.value, 0)
        return ctypes.get_errno() if ret < 0 else 0

    def exit_struct(self, cls: type[S]) -> S:
        return cls.from_address(self.run_base + abi.KVM_RUN_EXIT_OFFSET)

    def get_regs(self) -> abi.KvmRegs:
        return _get(self.fd, abi.Ioctl.KVM_GET_REGS, abi.KvmRegs)

    def set_regs(self, regs: abi.KvmRegs) -> None:
        _set(self.fd, abi.Ioctl.KVM_SET_REGS, regs)

    def get_sregs(self) -> abi.KvmSregs:
        return _get(self.fd, abi.Ioctl.KVM_GET_SREGS, abi.KvmSregs)

    def set_sregs(self, sregs: abi.KvmSregs) -> None:
        _set(self.fd, abi.Ioctl.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> abi.KvmFpu:
        return _get(self.fd, abi.Ioctl.KVM_GET_FPU, abi.KvmFpu)

    def set_fpu(self, fpu: abi.KvmFpu) -> None:
        _set(self.fd, abi.Ioctl.KVM_SET_FPU, fpu)

    def get_xsave(self, size: int) -> bytes:
        buf = (ctypes.c_uint8 * size)()
        request = abi.Ioctl.KVM_GET_XSAVE if size == abi.XSAVE_LEGACY_SIZE else abi.Ioctl.KVM_GET_XSAVE2
        _call(self.fd, request, ctypes.addressof(buf))
        return bytes(buf)

    def set_xsave(self, data: bytes) -> None:
        _set(self.fd, abi.Ioctl.KVM_SET_XSAVE, (ctypes.c_uint8 * len(data)).from_buffer_copy(data))

    def get_xcrs(self) -> abi.KvmXcrs:
        return _get(self.fd, abi.Ioctl.KVM_GET_XCRS, abi.KvmXcrs)

    def set_xcrs(self, xcrs: abi.KvmXcrs) -> None:
        _set(self.fd, abi.Ioctl.KVM_SET_XCRS, xcrs)

    def get_msrs(self, indices: list[int]) -> list[tuple[int, int]]:
        """Read MSRs; KVM stops at the first one it cannot read and returns how many it did."""
        # struct kvm_msrs as a numpy record array: filling and reading 40 entries is on the pause path.
        header = ctypes.sizeof(abi.KvmMsrsHeader)
        raw = np.zeros(header + len(indices) * _MSR_ENTRY.itemsize, dtype=np.uint8)
        raw[:4].view(np.uint32)[0] = len(indices)  # kvm_msrs.nmsrs
        entries = raw[header:].view(_MSR_ENTRY)
        entries["index"] = indices
        done = _call(self.fd, abi.Ioctl.KVM_GET_MSRS, raw.ctypes.data)
        return list(zip(entries["index"][:done].tolist(), entries["data"][:done].tolist(), strict=True))

    def set_msrs(self, msrs: list[tuple[int, int]]) -> int:
        buf = abi.msrs_buffer(len(msrs))
        abi.KvmMsrsHeader.from_buffer(buf).nmsrs = len(msrs)
        entries = (abi.KvmMsrEntry * len(msrs)).from_buffer(buf, ctypes.sizeof(abi.KvmMsrsHeader))
        for entry, (index, data) in zip(entries, msrs, strict=True):
            entry.index, entry.data = index, data
        return _call(self.fd, abi.Ioctl.KVM_SET_MSRS, ctypes.addressof(buf))

    def get_lapic(self) -> abi.KvmLapicState:
        return _get(self.fd, abi.Ioctl.KVM_GET_LAPIC, abi.KvmLapicState)

    def set_lapic(self, lapic: abi.KvmLapicState) -> None:
        _set(self.fd, abi.Ioctl.KVM_SET_LAPIC, lapic)

    def get_vcpu_events(self) -> abi.KvmVcpuEvents:
        return _get(self.fd, abi.Ioctl.KVM_GET_VCPU_EVENTS, abi.KvmVcpuEvents)

    def set_vcpu_events(self, events: abi.KvmVcpuEvents) -> None:
        _set(self.fd, abi.Ioctl.KVM_SET_VCPU_EVENTS, events)

    def get_mp_state(self) -> abi.MpState:
        return abi.MpState(_get(self.fd, abi.Ioctl.KVM_GET_MP_STATE, abi.KvmMpState).mp_state)

    def set_mp_state(self, state: abi.MpState) -> None:
        _set(self.fd, abi.Ioctl.KVM_SET_MP_STATE, abi.KvmMpState(mp_state=state.value))

    def get_debugregs(self) -> abi.KvmDebugregs:
        return _get(self.fd, abi.Ioctl.KVM_GET_DEBUGREGS, abi.KvmDebugregs)

    def set_debugregs(self, regs: abi.KvmDebugregs) -> None:
        _set(self.fd, abi.Ioctl.KVM_SET_DEBUGREGS, regs)

    def get_cpuid2(self) -> list[abi.KvmCpuidEntry2]:
        buf = abi.cpuid2_buffer(abi.KVM_MAX_CPUID_ENTRIES)
        abi.KvmCpuid2Header.from_buffer(buf).nent = abi.KVM_MAX_CPUID_ENTRIES
        _call(self.fd, abi.Ioctl.KVM_GET_CPUID2, ctypes.addressof(buf))
        count = abi.KvmCpuid2Header.from_buffer(buf).nent
        base, size = ctypes.sizeof(abi.KvmCpuid2Header), ctypes.sizeof(abi.KvmCpuidEntry2)
        return [abi.KvmCpuidEntry2.from_buffer_copy(buf, base + i * size) for i in range(count)]

    def set_cpuid2(self, entries: list[abi.KvmCpuidEntry2]) -> None:
        buf = abi.cpuid2_buffer(len(entries))
        abi.KvmCpuid2Header.from_buffer(buf).nent = len(entries)
        base, size = ctypes.sizeof(abi.KvmCpuid2Header), ctypes.sizeof(abi.KvmCpuidEntry2)
        for i, entry in enumerate(entries):
            ctypes.memmove(ctypes.addressof(buf) + base + i * size, ctypes.addressof(entry), size)
        _call(self.fd, abi.Ioctl.KVM_SET_CPUID2, ctypes.addressof(buf))

    def get_tsc_khz(self) -> int:
        return _call(self.fd, abi.Ioctl.KVM_GET_TSC_KHZ)

    def set_tsc_khz(self, khz: int) -> None:
        _call(self.fd, abi.Ioctl.KVM_SET_TSC_KHZ, khz)

    def close(self) -> None:
        if self.fd < 0:
            return
        self.run_header = None
        self._run_map.close()
        os.close(self.fd)
        self.fd = -1
