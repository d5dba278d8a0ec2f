"""vmm layer: ``Vm`` -- one virtual machine: memory, devices, a CPU backend; pause/resume, dirty pages, state.

This is the object the migration engine drives::

    vm = Vm.create(MachineConfig(memory=64 * MIB), read_kernel(path), "dirty_mib=4")
    vm.start()
    vm.start_dirty_tracking()                   # once; the log then stays on
    ranges = vm.populated_ranges()              # round 0: every populated page
    dirty = vm.harvest_dirty()                  # KVM log | VMM writes (the first: all populated), cleared on harvest
    latency = vm.pause()                        # bounded; no half-done I/O afterwards
    state = vm.capture_state()                  # VmState, .to_bytes() is versioned
    ...
    dst = Vm.restore(VmState.from_bytes(blob), GuestMemory(size, fd=memfd))   # paused
    dst.resume()

States: CREATED -start-> RUNNING <-pause/resume-> PAUSED; any -> STOPPED (guest stop or close()).
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cvmotion.abi.cvmio import CVMIO_PORT, CVMIO_PORT_COUNT
from cvmotion.errors import UsageError, VcpuError
from cvmotion.vmm.backend import Backend, BackendKind, GuestStop, StopKind
from cvmotion.vmm.devices.bus import IoBus
from cvmotion.vmm.devices.cvmio import CvmIo
from cvmotion.vmm.devices.power import EXIT_PORT, ExitPort
from cvmotion.vmm.devices.serial import COM1_BASE, COM1_PORTS, Console, Serial
from cvmotion.vmm.dirty import DirtyLog
from cvmotion.vmm.emu_backend import EmuBackend
from cvmotion.vmm.kvm import kvm_usable
from cvmotion.vmm.kvm_backend import KvmBackend
from cvmotion.vmm.layout import PAGE_SIZE, Gpa
from cvmotion.vmm.loader import KernelImage, load_kernel
from cvmotion.vmm.memory import GuestMemory
from cvmotion.vmm.snapshot import STATE_VERSION, VmState

__all__ = ["MachineConfig", "RunState", "Vm", "select_backend"]

DEFAULT_PAUSE_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True)
class MachineConfig:
    """What to build: RAM bytes, vCPUs, and a backend (``None``: KVM when usable, else emulated).

    ``dirty_log_initially_set`` selects KVM's ``KVM_DIRTY_LOG_INITIALLY_SET`` mode (see kvm_backend).
    """

    memory: int
    vcpus: int = 1
    backend: BackendKind | None = None
    dirty_log_initially_set: bool = False


class RunState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


def select_backend(requested: BackendKind | None) -> tuple[BackendKind, str]:
    """The backend to use and why; an explicit ``kvm`` request fails when KVM is unusable.

    Raises:
        UsageError: ``kvm`` was requested and /dev/kvm cannot run a VM.
    """
    if requested is BackendKind.EMULATED:
        return BackendKind.EMULATED, "requested"
    ok, reason = kvm_usable()
    if ok:
        return BackendKind.KVM, "/dev/kvm is usable"
    if requested is BackendKind.KVM:
        raise UsageError(f"--backend kvm: /dev/kvm is unusable: {reason}")
    return BackendKind.EMULATED, f"/dev/kvm is unusable ({reason})"


class Vm:
    """A VM in this process.  Build with ``Vm.create`` (boot an image) or ``Vm.restore`` (from a state)."""

    def __init__(self, config: MachineConfig, memory: GuestMemory | None = None) -> None:
        self.config = config
        self._closed = False
        self.backend_kind, self.backend_reason = select_backend(config.backend)
        self.memory = memory if memory is not None else GuestMemory(config.memory)
        if self.memory.size != config.memory:
            raise UsageError(f"memory is {self.memory.size:#x} bytes, the config says {config.memory:#x}")
        self.console = Console()
        self.serial = Serial(self.console)
        self.cvmio = CvmIo(self.memory)
        self.cmdline = ""
        bus = IoBus()
        bus.register(COM1_BASE, COM1_PORTS, self.serial)
        bus.register(CVMIO_PORT, CVMIO_PORT_COUNT, self.cvmio)
        bus.register(EXIT_PORT, 4, ExitPort(self._on_exit_port))
        self._lock = threading.Lock()
        self._tracking = False
        self._threads_parked = False  # prepare() started the vCPU threads, parked: restore() only fills state
        self.state = RunState.CREATED
        self.paused_since: float | None = None  # time.monotonic() when the running vCPUs were asked to stop
        self.last_pause: float | None = None  # seconds the last completed pause lasted (pause asked -> resumed)
        self.backend: Backend
        if self.backend_kind is BackendKind.KVM:
            self.backend = KvmBackend(self.memory, bus, config.vcpus, initially_set=config.dirty_log_initially_set)
        else:
            self.backend = EmuBackend(self.memory, bus, config.vcpus)

    @classmethod
    def create(cls, config: MachineConfig, image: KernelImage, cmdline: str = "") -> Vm:
        """Build a VM and load a multiboot kernel; ``start()`` runs it.

        ``tsc_khz=`` is appended to the command line unless given: the guests' only clock is the TSC.

        Raises:
            ImageError: the image does not fit.  UsageError: bad size or vCPU count.  KvmError.
        """
        vm = cls(config)
        try:
            if "tsc_khz=" not in cmdline:
                cmdline = f"{cmdline} tsc_khz={vm.backend.tsc_khz()}".strip()
            boot = load_kernel(vm.memory, image, cmdline)
            vm.cmdline = boot.cmdline
            vm.backend.setup_boot(boot)
        except BaseException:
            vm.close()
            raise
        return vm

    @classmethod
    def prepare(cls, config: MachineConfig, memory: GuestMemory) -> Vm:
        """An empty VM over ``memory`` (backend, memory slots, vCPUs) for ``restore(prepared=...)`` to fill.

        Creating a KVM VM costs ~10 ms here; an incoming migration builds it while pages stream in, so the
        switchover only loads registers into it.  Its vCPU threads are started here too, parked before any
        guest code (starting them and waiting for them to park took 0.3-1 ms of the switchover).
        """
        vm = cls(config, memory)
        try:
            vm.backend.start(paused=True)
        except BaseException:
            vm.discard()
            raise
        vm._threads_parked = True
        return vm

    @classmethod
    def restore(
        cls, state: VmState, memory: GuestMemory, backend: BackendKind | None = None, *, prepared: Vm | None = None
    ) -> Vm:
        """A paused VM continuing from ``state`` over ``memory`` (same size); call ``resume()``.

        ``prepared`` (from ``prepare``) is used when it matches the state (backend, vCPUs, memory) and was never
        started; otherwise it is discarded and a VM is built here.

        Raises:
            UsageError: the state was captured on another backend, or sizes differ.
        """
        kind = backend if backend is not None else state.backend
        if kind is not state.backend:
            raise UsageError(f"state was captured on the {state.backend.value} backend, cannot restore on {kind.value}")
        vm: Vm | None = None
        if prepared is not None:
            if prepared._fits(state, memory, kind):
                vm = prepared
            else:
                prepared.discard()
        if vm is None:
            vm = cls(MachineConfig(state.memory_size, state.vcpus, kind), memory)
        try:
            if vm.backend_kind is not state.backend:
                raise UsageError(f"state needs the {state.backend.value} backend; {vm.backend_reason}")
            vm.backend.restore(state.machine)
            vm.serial.restore(state.serial)
            vm.cvmio.restore(state.cvmio)
            vm.cmdline = state.cmdline
            vm.backend.invalidate_code(0, memory.layout.low_size)
            vm.cvmio.interrupt_waits()
            if not vm._threads_parked:
                vm.backend.start(paused=True)
            vm.state = RunState.PAUSED
        except BaseException:
            vm.close()
            raise
        return vm

    # --- run control ----------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self.state is not RunState.CREATED:
                raise UsageError(f"start: the VM is {self.state.value}")
            self.backend.start()
            self.state = RunState.RUNNING

    def pause(self, timeout: float = DEFAULT_PAUSE_TIMEOUT) -> float:
        """Stop every vCPU (bounded by ``timeout``); returns the pause latency in seconds."""
        with self._lock:
            if self.state is not RunState.RUNNING:
                return 0.0
            t0 = time.perf_counter()
            # The blackout a guest sees starts when its vCPUs are asked to stop (the earliest any may stop).
            self.paused_since = time.monotonic()
            self.cvmio.interrupt_waits()
            try:
                self.backend.pause(timeout)
            except BaseException:
                self.paused_since = None
                raise
            self.state = RunState.PAUSED
            return time.perf_counter() - t0

    def resume(self) -> float | None:
        """Let the vCPUs run again; returns how long they were stopped (seconds, monotonic clock), when known.

        The pause is timed from ``pause`` being asked to the vCPUs being released here, so it bounds what the
        guest can have missed (``last_pause``); a restored VM's first resume has no start to measure from.
        """
        with self._lock:
            if self.state is not RunState.PAUSED:
                return None
            self.cvmio.allow_waits()
            self.backend.resume()
            self.state = RunState.RUNNING
            since, self.paused_since = self.paused_since, None
            self.last_pause = None if since is None else time.monotonic() - since
            return self.last_pause

    def wait(self, timeout: float | None) -> GuestStop | None:
        """Wait until the guest stops (or ``timeout``); the stop reason, or None while it runs."""
        return self.backend.wait_stop(timeout)

    @property
    def stop_reason(self) -> GuestStop | None:
        return self.backend.stop_reason

    def check(self) -> None:
        """Raise ``VcpuError`` (naming the last RIP) if the guest faulted."""
        stop = self.backend.stop_reason
        if stop is not None and stop.is_error:
            raise VcpuError(stop.message, rip=stop.rip)

    def _fits(self, state: VmState, memory: GuestMemory, kind: BackendKind) -> bool:
        return (
            not self._closed
            and self.state is RunState.CREATED
            and self.memory is memory
            and self.backend_kind is kind
            and self.config.vcpus == state.vcpus
            and self.config.memory == state.memory_size
        )

    def discard(self) -> None:
        """Stop the vCPUs and fail waiting cvm-io requests, but leave the memory mapped: for an unused
        prepared VM, whose memory belongs to the caller.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.cvmio.close()
        self.backend.close()
        self.state = RunState.STOPPED

    def close(self) -> None:
        """Stop the vCPUs, fail waiting cvm-io requests, unmap memory.  Idempotent."""
        if self._closed:
            return
        self.discard()
        self.memory.close()

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_exit_port(self, code: int) -> None:
        message = f"guest requested shutdown with exit code {code}"
        self.backend.request_stop(GuestStop(StopKind.SHUTDOWN, message, exit_code=code))

    # --- memory and dirty pages -----------------------------------------------------------------
    @property
    def memfd(self) -> int:
        return self.memory.fd

    def start_dirty_tracking(self) -> None:
        """Turn the dirty log on: from now on ``harvest_dirty`` reports every page written by the guest or the VMM.

        Nothing is ever dropped from the log.  The first harvest also holds every page populated before this call
        (the guest's writes before it were not logged, and a consumer such as the secure processor's "exported
        and clean" view must not miss one) and every VMM write not harvested yet; a second call changes nothing.
        """
        if self._tracking:
            return
        was_running = self.state is RunState.RUNNING
        if was_running and self.backend_kind is BackendKind.EMULATED:
            self.pause()  # unicorn hooks may only change while emulation is stopped
        try:
            self.backend.start_dirty_tracking()
            self._tracking = True
            # After the log is on: a guest write racing this call either populated its page before the look-up
            # below (marked here) or lands in the log.
            for gpa, length in self.memory.populated_ranges():
                self.memory.vmm_dirty.mark_range(gpa, length)
        finally:
            if was_running and self.backend_kind is BackendKind.EMULATED:
                self.resume()

    def harvest_dirty(self) -> DirtyLog:
        """Pages dirtied since the previous harvest (or since tracking started): guest log | VMM writes."""
        guest = self.backend.harvest_dirty()
        vmm = self.memory.vmm_dirty.take_marked()  # usually nothing: the VMM writes guest memory rarely while it runs
        return guest if vmm is None else guest | vmm

    def populated_ranges(self) -> list[tuple[Gpa, int]]:
        return self.memory.populated_ranges()

    def read_pages(self, gfns: Iterable[int] | npt.NDArray[np.uint64]) -> bytes:
        return self.memory.read_pages(gfns)

    def write_pages(self, gfns: Iterable[int] | npt.NDArray[np.uint64], data: bytes | memoryview) -> None:
        """Write whole pages as the VMM (tracked as dirty); the VM should be paused or not yet started."""
        frames = np.asarray(list(gfns) if not isinstance(gfns, np.ndarray) else gfns, dtype=np.uint64)
        self.memory.write_pages(frames, data)
        if frames.size and self.backend_kind is BackendKind.EMULATED:  # KVM caches no translations
            ordered = np.unique(frames)
            breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
            for run in np.split(ordered, breaks):
                self.backend.invalidate_code(int(run[0]) * PAGE_SIZE, run.size * PAGE_SIZE)

    # --- state ----------------------------------------------------------------------------------
    def capture_state(self) -> VmState:
        """vCPU, VM-level and device state of a paused (or stopped, or not started) VM."""
        if self.state is RunState.RUNNING:
            raise UsageError("capture_state: pause the VM first")
        return VmState(
            version=STATE_VERSION,
            backend=self.backend_kind,
            memory_size=self.memory.size,
            vcpus=self.config.vcpus,
            machine=self.backend.capture(),  # type: ignore[arg-type]
            serial=self.serial.save(),
            cvmio=self.cvmio.save(),
            cmdline=self.cmdline,
        )
