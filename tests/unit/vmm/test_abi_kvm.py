"""The KVM ABI table and layouts against the real <linux/kvm.h>, compiled with gcc when it is present."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from cvmotion.abi import kvm

_HEADER = Path("/usr/include/linux/kvm.h")

_STRUCTS = {
    "kvm_userspace_memory_region": kvm.KvmUserspaceMemoryRegion,
    "kvm_regs": kvm.KvmRegs,
    "kvm_segment": kvm.KvmSegment,
    "kvm_dtable": kvm.KvmDtable,
    "kvm_sregs": kvm.KvmSregs,
    "kvm_fpu": kvm.KvmFpu,
    "kvm_xcrs": kvm.KvmXcrs,
    "kvm_msr_entry": kvm.KvmMsrEntry,
    "kvm_msrs": kvm.KvmMsrsHeader,
    "kvm_lapic_state": kvm.KvmLapicState,
    "kvm_vcpu_events": kvm.KvmVcpuEvents,
    "kvm_mp_state": kvm.KvmMpState,
    "kvm_debugregs": kvm.KvmDebugregs,
    "kvm_clock_data": kvm.KvmClockData,
    "kvm_irqchip": kvm.KvmIrqchip,
    "kvm_cpuid_entry2": kvm.KvmCpuidEntry2,
    "kvm_cpuid2": kvm.KvmCpuid2Header,
    "kvm_dirty_log": kvm.KvmDirtyLog,
    "kvm_clear_dirty_log": kvm.KvmClearDirtyLog,
    "kvm_enable_cap": kvm.KvmEnableCap,
}
# (C expression, our value) pairs for offsets that matter to the run loop and state capture
_OFFSETS = {
    "offsetof(struct kvm_run, exit_reason)": kvm.KvmRunHeader.exit_reason.offset,
    "offsetof(struct kvm_run, immediate_exit)": kvm.KvmRunHeader.immediate_exit.offset,
    "offsetof(struct kvm_run, io)": kvm.KVM_RUN_EXIT_OFFSET,
    "offsetof(struct kvm_run, io.data_offset)": kvm.KVM_RUN_EXIT_OFFSET + kvm.KvmRunExitIo.data_offset.offset,
    "offsetof(struct kvm_run, mmio.is_write)": kvm.KVM_RUN_EXIT_OFFSET + kvm.KvmRunExitMmio.is_write.offset,
    "offsetof(struct kvm_run, internal.data)": kvm.KVM_RUN_EXIT_OFFSET + kvm.KvmRunExitInternal.data.offset,
    "offsetof(struct kvm_run, system_event.data)": kvm.KVM_RUN_EXIT_OFFSET + kvm.KvmRunExitSystemEvent.data.offset,
    "offsetof(struct kvm_sregs, efer)": kvm.KvmSregs.efer.offset,
    "offsetof(struct kvm_vcpu_events, smi)": kvm.KvmVcpuEvents.smi_smm.offset,
    "offsetof(struct kvm_vcpu_events, triple_fault)": kvm.KvmVcpuEvents.triple_fault_pending.offset,
    "offsetof(struct kvm_vcpu_events, exception_payload)": kvm.KvmVcpuEvents.exception_payload.offset,
    "offsetof(struct kvm_clock_data, host_tsc)": kvm.KvmClockData.host_tsc.offset,
}


def _compile_and_run(tmp_path: Path, exprs: list[str]) -> list[int]:
    body = "\n".join(f'    printf("%llu\\n", (unsigned long long)({e}));' for e in exprs)
    src = tmp_path / "probe.c"
    src.write_text(f"#include <stddef.h>\n#include <stdio.h>\n#include <linux/kvm.h>\nint main(void) {{\n{body}\n}}\n")
    exe = tmp_path / "probe"
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True, capture_output=True, timeout=60)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=10).stdout
    return [int(line) for line in out.split()]


@pytest.mark.skipif(not _HEADER.exists() or shutil.which("gcc") is None, reason="needs gcc and linux/kvm.h")
def test_matches_linux_headers(tmp_path: Path) -> None:
    exprs: list[str] = []
    ours: list[int] = []
    for member in kvm.Ioctl:
        exprs.append(member.name)
        ours.append(member.value)
    for member in kvm.Cap:
        exprs.append(member.name)
        ours.append(member.value)
    for c_name, cls in _STRUCTS.items():
        exprs.append(f"sizeof(struct {c_name})")
        ours.append(ctypes.sizeof(cls))
    for expr, value in _OFFSETS.items():
        exprs.append(expr)
        ours.append(value)
    for name, value in (
        ("KVM_MEM_LOG_DIRTY_PAGES", kvm.KVM_MEM_LOG_DIRTY_PAGES),
        ("KVM_DIRTY_LOG_INITIALLY_SET", kvm.KVM_DIRTY_LOG_INITIALLY_SET),
        ("KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE", kvm.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE),
        ("KVM_API_VERSION", kvm.KVM_API_VERSION),
        ("KVM_EXIT_SHUTDOWN", kvm.ExitReason.SHUTDOWN),
        ("KVM_EXIT_INTERNAL_ERROR", kvm.ExitReason.INTERNAL_ERROR),
        ("KVM_EXIT_SYSTEM_EVENT", kvm.ExitReason.SYSTEM_EVENT),
        ("KVM_MP_STATE_HALTED", kvm.MpState.HALTED),
        ("KVM_IRQCHIP_IOAPIC", kvm.IrqchipId.IOAPIC),
    ):
        exprs.append(name)
        ours.append(int(value))
    theirs = _compile_and_run(tmp_path, exprs)
    mismatches = [f"{e}: header {t:#x}, ours {o:#x}" for e, t, o in zip(exprs, theirs, ours, strict=True) if t != o]
    assert mismatches == []


def test_layouts_reject_unknown_fields() -> None:
    regs = kvm.KvmRegs()
    with pytest.raises(AttributeError):
        regs.rpi = 1  # type: ignore[attr-defined]


def test_variable_buffers_have_room() -> None:
    assert ctypes.sizeof(kvm.msrs_buffer(3)) == 8 + 3 * 16
    assert ctypes.sizeof(kvm.cpuid2_buffer(2)) == 8 + 2 * 40
