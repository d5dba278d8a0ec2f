"""vmm layer: vCPU state -- what a paused vCPU is, how it is read out of KVM and put back, in Firecracker's order.

Capture order (Firecracker ``vstate/vcpu/x86_64.rs`` ``save_state``): MP state first, because
``KVM_GET_MP_STATE`` runs ``kvm_apic_accept_events()`` and may change LAPIC/vCPU state; then regs, sregs,
xsave, xcrs, debug registers, LAPIC, TSC frequency, CPUID, MSRs, and vCPU events last (the other GETs
may still move a pending event).  Restore order: CPUID (it decides which MSRs and xsave features
exist), MP state, sregs *before* regs (as QEMU does: sregs sets EFER/CR0, which decide how KVM takes
RIP/RFLAGS), xsave, xcrs, debug registers, LAPIC (after sregs, whose ``apic_base`` enables it), MSRs
(after the LAPIC: the TSC-deadline MSR needs it), vCPU events last.

The caller must have completed any pending port I/O first: ``KVM_RUN`` with ``immediate_exit = 1``
finishes an in-flight IN/OUT without running guest code (api.rst, "KVM_RUN ... immediate_exit"); the
KVM backend's pause does exactly that, so a captured RIP is never in the middle of an instruction.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from cvmotion.abi import kvm as abi
from cvmotion.errors import KvmError
from cvmotion.vmm.kvm import VcpuFd

__all__ = ["EmuVcpuState", "KvmVcpuState", "capture_kvm_vcpu", "cpuid_entries", "restore_kvm_vcpu"]


@dataclass(frozen=True, slots=True)
class KvmVcpuState:
    """One vCPU as KVM sees it; the byte fields are the raw ``struct kvm_*`` images."""

    index: int
    mp_state: abi.MpState
    regs: bytes
    sregs: bytes
    xsave: bytes
    xcrs: bytes
    debugregs: bytes
    lapic: bytes
    tsc_khz: int
    cpuid: bytes  # kvm_cpuid_entry2[] back to back
    msrs: tuple[tuple[int, int], ...]
    vcpu_events: bytes

    @property
    def rip(self) -> int:
        return int(abi.KvmRegs.from_buffer_copy(self.regs).rip)


@dataclass(frozen=True, slots=True)
class EmuVcpuState:
    """One vCPU of the emulated backend: architectural registers by unicorn name, and whether it runs."""

    index: int
    started: bool
    registers: tuple[tuple[str, int], ...]

    @property
    def rip(self) -> int:
        return dict(self.registers).get("EIP", 0)


def capture_kvm_vcpu(fd: VcpuFd, msr_indices: list[int], xsave_size: int, cpuid: bytes, tsc_khz: int) -> KvmVcpuState:
    """Read a parked vCPU (no pending I/O) out of KVM.

    ``cpuid`` and ``tsc_khz`` are what the VMM itself set on this vCPU (they change only when the VMM
    sets them), so the caller passes its copy instead of paying two more ioctls on the pause path.
    """
    mp_state = fd.get_mp_state()
    regs = bytes(fd.get_regs())
    sregs = bytes(fd.get_sregs())
    xsave = fd.get_xsave(xsave_size)
    xcrs = bytes(fd.get_xcrs())
    debugregs = bytes(fd.get_debugregs())
    lapic = bytes(fd.get_lapic())
    msrs = fd.get_msrs(msr_indices)
    if len(msrs) != len(msr_indices):
        bad = msr_indices[len(msrs)]
        raise KvmError("KVM_GET_MSRS", 0, f"vCPU {fd.index}: MSR {bad:#x} could not be read")
    events = bytes(fd.get_vcpu_events())
    return KvmVcpuState(
        fd.index, mp_state, regs, sregs, xsave, xcrs, debugregs, lapic, tsc_khz, cpuid, tuple(msrs), events
    )


def cpuid_entries(blob: bytes) -> list[abi.KvmCpuidEntry2]:
    size = ctypes.sizeof(abi.KvmCpuidEntry2)
    return [abi.KvmCpuidEntry2.from_buffer_copy(blob, i) for i in range(0, len(blob) - size + 1, size)]


def restore_kvm_vcpu(fd: VcpuFd, state: KvmVcpuState, *, cpuid_set: bool = False) -> None:
    """Put a captured vCPU into a fresh vCPU of a VM with the same memory layout and irqchip.

    ``cpuid_set``: the vCPU already holds exactly ``state.cpuid`` (the VMM set the same table when it made the
    vCPU), so KVM_SET_CPUID2 is skipped: it was the dearest call of a restore, 0.18-0.3 ms of the switchover's
    0.7-1.2 under nested KVM (KVM recomputes the vCPU's derived state on it).
    """
    if not cpuid_set:
        fd.set_cpuid2(cpuid_entries(state.cpuid))
    fd.set_mp_state(state.mp_state)
    fd.set_sregs(abi.KvmSregs.from_buffer_copy(state.sregs))
    fd.set_regs(abi.KvmRegs.from_buffer_copy(state.regs))
    fd.set_xsave(state.xsave)
    fd.set_xcrs(abi.KvmXcrs.from_buffer_copy(state.xcrs))
    fd.set_debugregs(abi.KvmDebugregs.from_buffer_copy(state.debugregs))
    fd.set_lapic(abi.KvmLapicState.from_buffer_copy(state.lapic))
    done = fd.set_msrs(list(state.msrs))
    if done != len(state.msrs):
        index = state.msrs[done][0]
        raise KvmError("KVM_SET_MSRS", 0, f"vCPU {fd.index}: MSR {index:#x} was refused")
    fd.set_vcpu_events(abi.KvmVcpuEvents.from_buffer_copy(state.vcpu_events))
