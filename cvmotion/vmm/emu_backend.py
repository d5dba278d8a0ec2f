"""vmm layer: the emulated backend -- the same guest images on the unicorn CPU emulator, without /dev/kvm.

EMULATED: there is no hardware virtualization here; unicorn (QEMU's TCG) interprets the guest.  Guest RAM
is the same memfd, handed to unicorn with ``mem_map_ptr`` (low RAM only: the 32-bit guests cannot reach
the region above 4 GiB).  Port I/O reaches the same device bus through IN/OUT instruction hooks.

Dirty tracking is a ``UC_HOOK_MEM_WRITE`` hook over guest RAM that marks a byte per page (about half a
microsecond per guest store).  Unicorn's alternative, write-protecting pages with ``mem_protect`` and
catching the fault, flushes its translation cache on every call (~56 ms a page) and is not used.

Differences from KVM, stated: only the bootstrap processor executes (application processors stay in
wait-for-SIPI, as they do under KVM with these single-threaded guests); CPU exceptions are not
delivered through the guest IDT -- any exception stops the VM as a fault naming the vector and EIP
(under KVM the same guests, which install no IDT, triple-fault); segment descriptor caches are
reloaded from the guest GDT on restore.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import numpy as np
import unicorn as uc
import unicorn.x86_const as x86

from cvmotion.errors import KvmError, UsageError
from cvmotion.vmm.backend import BackendKind, GuestStop, PauseGate, StopKind
from cvmotion.vmm.devices.bus import IoBus
from cvmotion.vmm.dirty import DirtyLog, bitmap_words
from cvmotion.vmm.layout import PAGE_SHIFT
from cvmotion.vmm.loader import BootInfo
from cvmotion.vmm.memory import GuestMemory
from cvmotion.vmm.vcpu import EmuVcpuState

__all__ = ["EmuBackend", "EmuMachineState", "host_tsc_khz"]

_UNTIL = 0xFFFFFFFF  # never reached: emulation ends on emu_stop, hlt or a fault
_FLAT = ("CR0", "CR3", "CR4")
_TABLES = ("GDTR", "IDTR")
_SEGMENTS = ("CS", "SS", "DS", "ES", "FS", "GS")
_GPRS = ("EAX", "EBX", "ECX", "EDX", "ESI", "EDI", "ESP", "EBP", "EIP", "EFLAGS", "CR2", "DR0", "DR1", "DR2", "DR3")
_UC_ERRORS = {
    uc.UC_ERR_INSN_INVALID: "#UD invalid opcode",
    uc.UC_ERR_READ_UNMAPPED: "read from unmapped memory",
    uc.UC_ERR_WRITE_UNMAPPED: "write to unmapped memory",
    uc.UC_ERR_FETCH_UNMAPPED: "instruction fetch from unmapped memory",
    uc.UC_ERR_EXCEPTION: "unhandled CPU exception",
}
_tsc_khz: int | None = None


class _Cpu(Protocol):
    """The part of ``unicorn.Uc`` this backend uses (the binding is untyped)."""

    def mem_map(self, address: int, size: int, perms: int = ...) -> None: ...
    def mem_map_ptr(self, address: int, size: int, perms: int, ptr: int) -> None: ...
    def mem_unmap(self, address: int, size: int) -> None: ...
    def mem_write(self, address: int, data: bytes) -> None: ...
    def reg_read(self, reg: int) -> Any: ...
    def reg_write(self, reg: int, value: Any) -> None: ...
    def hook_add(
        self,
        kind: int,
        callback: Callable[..., Any],
        user_data: object = ...,
        begin: int = ...,
        end: int = ...,
        arg1: int = ...,
    ) -> int: ...
    def emu_start(self, begin: int, until: int, timeout: int = ..., count: int = ...) -> None: ...
    def emu_stop(self) -> None: ...
    def ctl_remove_cache(self, begin: int, end: int) -> None: ...


_new_cpu = cast("Callable[[int, int], _Cpu]", uc.__dict__["Uc"])
UcError = cast("type[Exception]", uc.__dict__["UcError"])


@dataclass(frozen=True, slots=True)
class EmuMachineState:
    vcpus: tuple[EmuVcpuState, ...]


def _reg(name: str) -> int:
    value: int = getattr(x86, f"UC_X86_REG_{name}")
    return value


def host_tsc_khz() -> int:
    """Unicorn's RDTSC reads the host TSC; measure its rate once per process (20 ms)."""
    global _tsc_khz
    if _tsc_khz is None:
        cpu = _new_cpu(uc.UC_ARCH_X86, uc.UC_MODE_32)
        cpu.mem_map(0, 0x1000)
        cpu.mem_write(0, b"\x0f\x31\xf4")  # rdtsc; hlt

        def sample() -> tuple[int, int]:
            cpu.emu_start(0, 3)
            return time.perf_counter_ns(), (cpu.reg_read(_reg("EDX")) << 32) | cpu.reg_read(_reg("EAX"))

        t0, c0 = sample()
        time.sleep(0.02)
        t1, c1 = sample()
        _tsc_khz = max(1, (c1 - c0) * 1_000_000 // max(1, t1 - t0))
    return _tsc_khz


class EmuBackend:
    """Runs the bootstrap processor on unicorn in a thread; see the module docstring."""

    kind = BackendKind.EMULATED

    def __init__(self, memory: GuestMemory, bus: IoBus, vcpus: int) -> None:
        if vcpus < 1:
            raise UsageError(f"{vcpus} vCPUs requested; need at least 1")
        self._memory = memory
        self._bus = bus
        self._vcpus = vcpus
        self._gate = PauseGate()
        self._stop: GuestStop | None = None
        self._stop_event = threading.Event()
        self._closing = False
        self._stop_requested = False
        self._thread: threading.Thread | None = None
        self._fault_address: int | None = None
        self._exception: int | None = None
        self._dirty: bytearray | None = None
        self._dirty_hook: int | None = None
        # The hook and a concurrent harvest swap the bitmap under this lock, or a store marked into the
        # old bitmap after the harvest packed it would be lost.
        self._dirty_lock = threading.Lock()
        low = memory.layout.regions[0]
        self._low_pages = low.npages
        self._uc = _new_cpu(uc.UC_ARCH_X86, uc.UC_MODE_32)
        # ABI: unicorn reads and writes the memfd mapping directly; GuestMemory must outlive this Uc.
        self._uc.mem_map_ptr(low.gpa, low.size, uc.UC_PROT_ALL, memory.region_hva(low))
        self._uc.hook_add(uc.UC_HOOK_INSN, self._on_in, None, 1, 0, x86.UC_X86_INS_IN)
        self._uc.hook_add(uc.UC_HOOK_INSN, self._on_out, None, 1, 0, x86.UC_X86_INS_OUT)
        self._uc.hook_add(uc.UC_HOOK_INTR, self._on_interrupt)
        self._uc.hook_add(uc.UC_HOOK_MEM_INVALID, self._on_invalid)

    # --- hooks (run on the vCPU thread, inside emu_start) ---------------------------------------
    def _on_in(self, cpu: _Cpu, port: int, size: int, _: object) -> int:
        return self._bus.read(port, size)

    def _on_out(self, cpu: _Cpu, port: int, size: int, value: int, _: object) -> None:
        self._bus.write(port, size, value)
        if self._stop is not None or self._gate.requested:
            cpu.emu_stop()

    def _on_interrupt(self, cpu: _Cpu, vector: int, _: object) -> None:
        self._exception = vector
        cpu.emu_stop()

    def _on_invalid(self, cpu: _Cpu, access: int, address: int, size: int, value: int, _: object) -> bool:
        self._fault_address = address
        return False

    def _on_write(self, cpu: _Cpu, access: int, address: int, size: int, value: int, _: object) -> None:
        with self._dirty_lock:
            dirty = self._dirty
            if dirty is not None:
                page = address >> PAGE_SHIFT
                dirty[page] = 1
                last = (address + size - 1) >> PAGE_SHIFT
                if last != page and last < len(dirty):
                    dirty[last] = 1

    # --- lifecycle ------------------------------------------------------------------------------
    def setup_boot(self, boot: BootInfo) -> None:
        # Unicorn's 32-bit mode starts in flat protected mode (CR0.PE, 4 GiB segments): the multiboot state.
        for name, value in (("EIP", boot.entry), ("EAX", 0x2BADB002), ("EBX", boot.mbi), ("EFLAGS", 0x2)):
            self._uc.reg_write(_reg(name), value)

    def start(self, paused: bool = False) -> None:
        if paused:
            self._gate.request()  # the thread parks before its first emu_start
        self._thread = threading.Thread(target=self._loop, name="vcpu0-emulated", daemon=True)
        self._thread.start()
        if paused and not self._gate.wait_parked(1, 5.0):
            raise KvmError("start", 0, "emulated vCPU thread did not park")

    def _loop(self) -> None:
        try:
            while not self._closing and self._stop is None:
                if self._gate.requested:
                    self._gate.park()
                    continue
                self._stop_requested = False
                try:
                    self._uc.emu_start(self._uc.reg_read(_reg("EIP")), _UNTIL)
                except UcError as exc:
                    self._fault(exc)
                    break
                if self._exception is not None:
                    self._fault(None)
                    break
                if self._stop_requested or self._gate.requested or self._stop is not None or self._closing:
                    continue
                self._halted()
        finally:
            self._gate.exited()

    def _fault(self, exc: Exception | None) -> None:
        eip = self._uc.reg_read(_reg("EIP"))
        if exc is None:
            what = f"CPU exception vector {self._exception}"
        else:
            what = _UC_ERRORS.get(getattr(exc, "errno", -1), str(exc))
            if self._fault_address is not None:
                what += f" at address {self._fault_address:#x}"
        message = f"vCPU 0 (emulated): {what}; the emulator does not deliver exceptions through the IDT"
        self._set_stop(GuestStop(StopKind.CPU_EXCEPTION, message, rip=eip))

    def _halted(self) -> None:
        eip = self._uc.reg_read(_reg("EIP")) - 1  # unicorn stops after the HLT instruction
        interrupts = bool(self._uc.reg_read(_reg("EFLAGS")) & (1 << 9))
        why = "with interrupts enabled but no interrupt source" if interrupts else "with interrupts disabled"
        message = f"vCPU 0 halted {why} at RIP {eip:#x}: the guest stopped"
        self._set_stop(GuestStop(StopKind.HALTED, message, rip=eip))

    def _set_stop(self, stop: GuestStop) -> None:
        if self._stop is None:
            self._stop = stop
        self._stop_event.set()

    def request_stop(self, stop: GuestStop) -> None:
        """A device (the exit port) ended the VM; called on the vCPU thread inside a hook."""
        self._set_stop(stop)

    def pause(self, timeout: float) -> None:
        self._gate.request()
        deadline = time.monotonic() + timeout
        count = 1 if self._thread is not None else 0
        # emu_stop only affects a running emulation; repeat it until the thread has parked, which closes the
        # race with a thread that was just about to call emu_start.
        while True:
            self._stop_requested = True
            self._uc.emu_stop()
            if self._gate.wait_parked(count, 0.0005):
                return
            if time.monotonic() > deadline:
                raise KvmError("pause", 0, f"emulated vCPU did not stop within {timeout:.3g} s")

    def resume(self) -> None:
        self._gate.release()

    def wait_stop(self, timeout: float | None) -> GuestStop | None:
        self._stop_event.wait(timeout)
        return self._stop

    @property
    def stop_reason(self) -> GuestStop | None:
        return self._stop

    def tsc_khz(self) -> int:
        return host_tsc_khz()

    def close(self) -> None:
        self._closing = True
        self._gate.stop()
        if self._thread is not None:
            while self._thread.is_alive():
                self._uc.emu_stop()
                self._thread.join(0.01)
        self._set_stop(GuestStop(StopKind.CLOSED, "VM closed"))
        low = self._memory.layout.regions[0]
        self._uc.mem_unmap(low.gpa, low.size)

    # --- dirty tracking -------------------------------------------------------------------------
    def start_dirty_tracking(self) -> None:
        if self._dirty_hook is not None:
            return
        self._dirty = bytearray(self._low_pages)
        end = self._memory.layout.regions[0].end - 1
        self._dirty_hook = self._uc.hook_add(uc.UC_HOOK_MEM_WRITE, self._on_write, None, 0, end)

    def harvest_dirty(self) -> DirtyLog:
        if self._dirty is None:
            raise UsageError("dirty tracking is not started")
        with self._dirty_lock:
            taken, self._dirty = self._dirty, bytearray(self._low_pages)
        bitmaps = []
        for region in self._memory.layout.regions:
            words = np.zeros(bitmap_words(region.npages), dtype=np.uint64)
            if region.slot == 0:
                packed = np.packbits(np.frombuffer(taken, dtype=np.uint8) != 0, bitorder="little")
                words.view(np.uint8)[: packed.size] = packed
            bitmaps.append((region, words))
        return DirtyLog(bitmaps)

    def invalidate_code(self, gpa: int, length: int) -> None:
        """The VMM wrote guest memory behind unicorn's back: drop translated blocks covering it."""
        low_end = self._memory.layout.regions[0].end
        if gpa < low_end:
            self._uc.ctl_remove_cache(gpa, min(gpa + length, low_end))

    # --- state ----------------------------------------------------------------------------------
    def capture(self) -> EmuMachineState:
        regs: list[tuple[str, int]] = [(n, self._uc.reg_read(_reg(n))) for n in _FLAT + _GPRS + _SEGMENTS]
        for table in _TABLES:
            _, base, limit, _ = self._uc.reg_read(_reg(table))
            regs += [(f"{table}.base", base), (f"{table}.limit", limit)]
        bsp = EmuVcpuState(0, True, tuple(regs))
        aps = tuple(EmuVcpuState(i, False, ()) for i in range(1, self._vcpus))
        return EmuMachineState((bsp, *aps))

    def restore(self, state: object) -> None:
        if not isinstance(state, EmuMachineState):
            raise UsageError(f"cannot restore {type(state).__name__} on the emulated backend")
        if len(state.vcpus) != self._vcpus:
            raise UsageError(f"state has {len(state.vcpus)} vCPUs, this VM {self._vcpus}")
        regs = dict(state.vcpus[0].registers)
        try:
            for table in _TABLES:  # tables and control registers first: segment loads read the GDT
                self._uc.reg_write(_reg(table), (0, regs[f"{table}.base"], regs[f"{table}.limit"], 0))
            for name in _FLAT + _SEGMENTS + _GPRS:
                self._uc.reg_write(_reg(name), regs[name])
        except KeyError as exc:
            raise UsageError(f"emulated vCPU state lacks register {exc.args[0]}") from exc
