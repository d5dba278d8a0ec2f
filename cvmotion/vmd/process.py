"""vmd: the VM process — one per VM (like one QEMU per VM), the emulated hardware of one CVM.

It owns the VM (vCPUs through KVM or unicorn, guest memory as a memfd, devices) and, later, the CVM's
paravisor.  It is *hardware* in the trust model: guest plaintext lives here.  It talks to:

- the host's platform process (secure processor + migration agent), as hardware talks to the AMD-SP:
  it hands over the memfd (the SP reads and writes guest memory directly, as the real one does), asks
  ``can_run`` before any vCPU runs, and answers the SP's calls during migration (its dirty view,
  "hold paused", vCPU state capture and restore);
- the host daemon (untrusted) through ``control.sock`` (``vmd.protocol``, served by ``vmd.server``): run
  control, dirty logs *as page numbers*, populated ranges, the serial console, cvm-io requests (device I/O is
  shared memory by design) and guest message relay.  Nothing it returns to the daemon holds guest-private
  memory or keys.

The process outlives the daemon: a restarted daemon re-attaches through ``control.sock``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cvmotion.abi.cvmio import BlobKind
from cvmotion.attestation.client import AttestationClient, KeyReleaseClient
from cvmotion.attestation.keyrelease import TransferKey
from cvmotion.attestation.paravisor import Paravisor
from cvmotion.errors import CvmError, UsageError
from cvmotion.ipc import trace
from cvmotion.ipc.rpc import MAX_BLOB, Endpoint, Handler
from cvmotion.platformd.client import VmPlatformClient
from cvmotion.vmd.client import RelayClient
from cvmotion.vmd.dirty import DirtyViews
from cvmotion.vmd.protocol import (
    AttestationInfo,
    ConsolePage,
    HardwareCommand,
    Reattested,
    Resumption,
    VmInfo,
    VmMode,
    VmSpec,
)
from cvmotion.vmm.backend import BackendKind
from cvmotion.vmm.devices.dma import DmaConfig, DmaDevice
from cvmotion.vmm.images import load_image
from cvmotion.vmm.loader import BOOT_INFO_END, BOOT_INFO_GPA
from cvmotion.vmm.memory import GuestMemory
from cvmotion.vmm.snapshot import VmState
from cvmotion.vmm.vm import MachineConfig, RunState, Vm

__all__ = ["VmProcess"]

PAGE = 4096
_THROTTLE_PERIOD = 0.05  # auto-converge: each 50 ms window, the vCPUs sleep pct% of it
_TOKEN_REFRESH = 300.0  # the paravisor renews its token well before the service's lifetime runs out
_REATTACH_TIMEOUT = 60.0  # how long the hardware of a running guest waits for a replaced platform process
_REATTACH_POLL = 0.005
_POST_RETRIES = 300  # a guest's post waits this many tenths of a second for a daemon to take it
_FEED_GFNS = MAX_BLOB // 16  # GFNs per vm_dirty call: half the RPC's blob limit


class _ParavisorHost:
    """What the paravisor may use: guest memory (it runs inside the TEE), the host relay, the guest mailbox."""

    def __init__(self, proc: VmProcess) -> None:
        self._proc = proc

    def read_guest(self, gpa: int, length: int) -> bytes:
        assert self._proc.memory is not None
        return self._proc.memory.read(gpa, length)

    def write_guest(self, gpa: int, data: bytes) -> None:
        assert self._proc.memory is not None
        self._proc.memory.write(gpa, data)  # a VMM-side write: tracked as dirty, so it migrates

    def relay_guest_request(self, message: bytes) -> bytes:
        return self._proc.relay.guest_request(self._proc.handle, message)

    def endorsements(self) -> bytes | None:
        return self._proc.relay.ext_certs() or None

    def publish_token(self, token: bytes) -> None:
        vm = self._proc.vm
        if vm is not None:
            vm.cvmio.set_blob(BlobKind.ATTESTATION_TOKEN, token)

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        with contextlib.suppress(CvmError):
            self._proc.relay.event(kind, data, self._proc.spec.name)


class VmProcess:
    """The hardware of one VM, serving the daemon (control socket) and the platform (secure processor)."""

    def __init__(self, spec: VmSpec, vm_dir: Path, platform_socket: str) -> None:
        self.spec = spec
        self.dir = vm_dir
        self.platform_socket = platform_socket
        self.handle: int | None = None
        self.vm: Vm | None = None
        self.memory: GuestMemory | None = None
        self.dirty: DirtyViews | None = None
        self.platform: VmPlatformClient | None = None
        self._stop = threading.Event()
        self._lock = threading.RLock()
        self._user_paused = False
        self._throttle_pct = 0
        self.dma: DmaDevice | None = None  # the DMA load device, when the (measured) command line asks for one
        self._throttle_thread: threading.Thread | None = None
        self._controls: list[Endpoint] = []
        self.state_note = "created"
        self.paravisor: Paravisor | None = None
        self._restored = False
        self._prepared: Vm | None = None
        # A standby process (``--standby``) runs with a placeholder spec until the daemon hands it a VM
        # (``configure``); meanwhile it has paid the interpreter start-up and made a transfer key.
        self.configured = True
        self._spare_transfer: TransferKey | None = None
        self._parent = os.getppid()
        # Across a platform restart (a memory-preserving update): the token the platform gave this hardware, which
        # proves to its successor that this process is the hardware the guest ran on. Never leaves this process
        # except to the platform socket.
        self._hw_token: bytes | None = None
        self._platform_up = threading.Event()
        self.platform_restarted = False
        # The host daemon, over the newest live control connection (it relays guest messages for the paravisor).
        self.relay = RelayClient(self._controls)
        # Set by ``vmd.server``: the handlers of the daemon's and the SP's commands.
        self.control_handler: Handler | None = None
        self.hardware_handler: Handler | None = None

    def _make_paravisor(self) -> Paravisor | None:
        spec = self.spec
        if not spec.attestation_url:
            return None
        client = AttestationClient(spec.attestation_url)
        transfer = None
        if spec.key_release_url and spec.key_name:
            transfer, self._spare_transfer = self._spare_transfer, None
            transfer = transfer or TransferKey.generate()

        def attest(report: bytes, chain: bytes | None, runtime: bytes) -> str:
            return client.attest(report, chain, runtime, data_type="JSON")

        release = None
        if transfer is not None:
            releaser = KeyReleaseClient(str(spec.key_release_url))
            key_name = str(spec.key_name)

            def release(token: str) -> bytes:
                return releaser.release(key_name, token, transfer)

        return Paravisor(
            _ParavisorHost(self),
            spec.name,
            attest,
            release_key=release,
            runtime_data=transfer.runtime_data if transfer is not None else None,
        )

    def _run_paravisor(self, migrated: bool, resumed_at: float) -> None:
        """Attest now (bounded retries: the daemon or the service may be starting), then keep the token fresh."""
        if self.paravisor is None:
            self.paravisor = self._make_paravisor()
        paravisor = self.paravisor
        if paravisor is None:
            return
        for attempt in range(20):
            if self._stop.is_set():
                return
            try:
                if migrated:
                    paravisor.after_migration(resumed_at)
                else:
                    paravisor.boot()
                break
            except (CvmError, OSError) as exc:
                self.state_note = f"paravisor attestation failed: {exc}"
                self._stop.wait(min(0.1 * 2**attempt, 5.0))
        while not self._stop.wait(_TOKEN_REFRESH):
            vm = self.vm
            if vm is not None and vm.state is RunState.RUNNING:
                with contextlib.suppress(CvmError, OSError):
                    paravisor.attest("refresh")

    # -- set-up -------------------------------------------------------------------------------------

    def setup(self) -> None:
        spec = self.spec
        backend = BackendKind(spec.backend) if spec.backend else None
        if spec.mode == VmMode.LAUNCH.value:
            self.vm = Vm.create(MachineConfig(spec.memory, spec.vcpus, backend), load_image(spec.image), spec.cmdline)
            self.memory = self.vm.memory
            self.dirty = DirtyViews(self.vm, feeds={"sp": self._feed_sp})
            self.dma = self._make_dma(self.memory)
        elif spec.mode == VmMode.INCOMING.value:
            self.memory = GuestMemory(spec.memory, name=f"cvmotion-{spec.name}")
            # Built now, filled at activation: ~10 ms less inside the downtime (Vm.prepare). If it cannot be
            # built, activation builds it and reports why.
            with contextlib.suppress(CvmError, OSError):
                self._prepared = Vm.prepare(MachineConfig(spec.memory, spec.vcpus, backend), self.memory)
        else:
            raise UsageError(f"unknown VM mode {spec.mode!r}")
        if self.hardware_handler is None:
            raise UsageError("the VM process serves no secure processor commands (vmd.server installs them)")
        self.platform = self._connect_platform()
        self._hw_token = self.platform.attach(spec.name, spec.memory, spec.mode, self.memory.fd)
        self._platform_up.set()
        self.platform.on_close(self._platform_lost)
        threading.Thread(target=self._relay_posts, name="scheduled-events", daemon=True).start()
        # Ready before the guest runs here (its transfer key is an RSA key pair: ~0.1-0.3 s to make), so the
        # re-attestation right after a migration's resume does not pay for it.
        self.paravisor = self._make_paravisor()

    def _make_dma(self, memory: GuestMemory) -> DmaDevice | None:
        config = DmaConfig.from_cmdline(self.spec.cmdline, memory)
        return None if config is None else DmaDevice(memory, config, lambda: self._throttle_pct)

    def launch_ranges(self) -> list[tuple[int, int]]:
        """Page-aligned GPA ranges the launch measures: the kernel's segments and the boot information."""
        image = load_image(self.spec.image)
        ranges = [(BOOT_INFO_GPA, BOOT_INFO_END - BOOT_INFO_GPA)]
        for seg in image.segments:
            start = seg.gpa & ~(PAGE - 1)
            end = (seg.end + PAGE - 1) & ~(PAGE - 1)
            ranges.append((start, end - start))
        return sorted(ranges)

    # -- run control --------------------------------------------------------------------------------

    def _require_vm(self) -> Vm:
        if self.vm is None:
            raise UsageError("this VM is waiting for an incoming migration")
        return self.vm

    def _may_run(self) -> bool:
        if self.handle is None or self.platform is None:
            return False
        return self.platform.can_run(self.handle)

    # -- the platform process going away and coming back -------------------------------------------------

    def _platform_lost(self) -> None:
        """The platform connection closed. A running guest's hardware waits for the platform process that
        replaces it (a memory-preserving update; bounded); anything else stops, as hardware without its SP."""
        self._platform_up.clear()
        if self._stop.is_set() or self.vm is None or self._hw_token is None:
            self._stop.set()
            return
        threading.Thread(target=self._reattach_platform, name="platform-reattach", daemon=True).start()

    def _connect_platform(self) -> VmPlatformClient:
        """A connection to the platform process whose reader serves the SP's hardware commands itself (``ipc.rpc``'s
        inline methods: no pool hand-off inside a migration's blackout)."""
        assert self.hardware_handler is not None
        return VmPlatformClient.connect(
            self.platform_socket,
            self.hardware_handler,
            name=f"vm-{self.spec.name}->platform",
            inline=frozenset(HardwareCommand),
        )

    def _reattach_platform(self) -> None:
        assert self.memory is not None
        assert self.hardware_handler is not None
        deadline = time.monotonic() + _REATTACH_TIMEOUT
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                platform = self._connect_platform()
            except (CvmError, OSError):
                self._stop.wait(_REATTACH_POLL)
                continue
            try:
                token = platform.attach(
                    self.spec.name, self.spec.memory, self.spec.mode, self.memory.fd, reattach=self._hw_token
                )
            except (CvmError, OSError) as exc:
                platform.close()
                self.state_note = f"re-attaching to the platform failed: {exc}"
                self._stop.wait(_REATTACH_POLL)
                continue
            self.platform, self._hw_token, self.platform_restarted = platform, token, True
            self._platform_up.set()
            platform.on_close(self._platform_lost)
            vm = self.vm
            if vm is not None and vm.state is RunState.RUNNING and not self._may_run():
                # A platform that came back without this guest (it crashed; nothing was sealed): the guest's
                # context is gone, and hardware does not run a guest its SP does not hold.
                self.state_note = "the platform process came back without this guest: stopped"
                self._stop.set()
            return
        self.state_note = "no platform process came back"
        self._stop.set()

    def reattest(self) -> Reattested:
        """Attest again through the (restarted) SP: a fresh report over the guest's own channel, a new token."""
        paravisor = self.paravisor
        if paravisor is None:
            return Reattested(reattested=False, jti=None)
        attestation = paravisor.attest("platform-restart")
        self.platform_restarted = False
        return Reattested(reattested=True, jti=attestation.jti)

    # -- Scheduled Events --------------------------------------------------------------------------------

    def set_scheduled_events(self, document: bytes) -> None:
        self._require_vm().cvmio.set_blob(BlobKind.SCHEDULED_EVENTS, document)

    def _relay_posts(self) -> None:
        """Carry what the guest posts to its Scheduled Events mailbox to the daemon (retried while none is
        connected: a daemon hands over during a memory-preserving update)."""
        while not self._stop.is_set():
            vm = self.vm
            posted = vm.cvmio.wait_posted(0.5) if vm is not None else None
            if posted is None:
                if vm is None:
                    self._stop.wait(0.5)
                continue
            _, body = posted
            for _attempt in range(_POST_RETRIES):
                try:
                    self.relay.scheduled_events_post(self.spec.name, body)
                    break
                except (CvmError, OSError):
                    if self._stop.wait(0.1):
                        return

    def start(self) -> None:
        with self._lock:
            vm = self._require_vm()
            if not self._may_run():
                raise UsageError("the secure processor does not let this guest run")
            vm.start()
            if self.dma is not None:
                self.dma.start()
            self.state_note = "running"
        threading.Thread(target=self._run_paravisor, args=(False, time.time()), name="paravisor", daemon=True).start()

    def pause(self) -> float:
        with self._lock:
            self._user_paused = True
            vm = self._require_vm()
            if self.dma is not None:
                self.dma.quiesce()  # its DMA stops with the vCPUs: nothing written while paused
            with trace.span("vm pause"):
                return vm.pause()

    def resume(self) -> Resumption:
        """Run the vCPUs again (if the SP allows it): how long they were stopped, when known, and when they ran.

        A VM that arrived by live migration re-attests right after its first resume; that thread is started by
        ``Resumption.then``, after the caller has its answer (the new thread would hold the GIL for a switch
        interval, 5 ms, before this one could answer: time the guest was already running but the daemon did not
        know it).
        """
        # A platform process being replaced comes back in a moment: its successor decides whether the guest runs.
        self._platform_up.wait(_REATTACH_TIMEOUT)
        return self._resume(ask_sp=True)

    def run_for_sp(self) -> Resumption:
        """``resume`` at the secure processor's word (it has just activated this guest here): nothing to ask it."""
        return self._resume(ask_sp=False)

    def _resume(self, *, ask_sp: bool) -> Resumption:
        with self._lock:
            vm = self._require_vm()
            if ask_sp and not self._may_run():
                raise UsageError("the secure processor does not let this guest run (migration in progress)")
            self._user_paused = False
            with trace.span("vm resume"):
                paused = vm.resume()
            at = time.time()
            if self.dma is not None:
                self.dma.start()
            self.state_note = "running"
            first_run_here = self._restored
            self._restored = False
        then = None
        if first_run_here:
            # Arrived by live migration: the paravisor re-attests on this chip right after resume.
            thread = threading.Thread(target=self._run_paravisor, args=(True, at), name="paravisor", daemon=True)
            then = thread.start
        return Resumption(paused, at, then)

    def set_throttle(self, pct: int) -> None:
        if not 0 <= pct <= 99:
            raise UsageError(f"throttle {pct}% (0..99)")
        self._throttle_pct = pct
        if pct and self._throttle_thread is None:
            self._throttle_thread = threading.Thread(target=self._throttle_loop, name="throttle", daemon=True)
            self._throttle_thread.start()

    def _throttle_loop(self) -> None:
        # Auto-converge (QEMU's cpu-throttle): the vCPUs sleep pct% of every period.
        while not self._stop.is_set():
            pct = self._throttle_pct
            if not pct:
                time.sleep(_THROTTLE_PERIOD)
                continue
            time.sleep(_THROTTLE_PERIOD * (100 - pct) / 100)
            with self._lock:
                vm = self.vm
                if vm is None or self._user_paused or vm.state is not RunState.RUNNING:
                    continue
                vm.pause()
            time.sleep(_THROTTLE_PERIOD * pct / 100)
            with self._lock:
                # vm.state changed under us since the check above (re-read through a call for the type checker)
                if not self._user_paused and _run_state(vm) is RunState.PAUSED and self._may_run():
                    vm.resume()

    def info(self) -> VmInfo:
        vm = self.vm
        return VmInfo(
            name=self.spec.name,
            pid=os.getpid(),
            mode=self.spec.mode,
            state=vm.state.value if vm else "incoming",
            handle=self.handle,
            memory=self.spec.memory,
            vcpus=self.spec.vcpus,
            backend=vm.backend_kind.value if vm else self.spec.backend,
            image=self.spec.image,
            stop_reason=vm.stop_reason.message if vm and vm.stop_reason else None,
            console_lines=vm.console.line_count if vm else 0,
            throttle=self._throttle_pct,
        )

    def attestation(self) -> AttestationInfo:
        """The paravisor's current token and what it says (empty before the first attestation)."""
        paravisor = self.paravisor
        current = paravisor.current if paravisor else None
        if paravisor is None or current is None:
            return AttestationInfo()
        return AttestationInfo(
            token=current.token,
            jti=current.jti,
            chip_id=current.chip_id,
            tcb=current.tcb,
            platform=current.platform,
            issued_at=current.issued_at,
            reason=current.reason,
            data_key=paravisor.data_key_fingerprint(),
        )

    def console(self, since: int) -> ConsolePage:
        vm = self._require_vm()
        count = vm.console.line_count
        history = vm.console.lines()
        first = count - len(history)
        return ConsolePage(lines=history[max(0, since - first) :], next=count)

    def start_dirty_tracking(self) -> None:
        with self._lock:  # the emulated backend pauses to add its hook: never across the SP's hold
            self.require_dirty().start()

    def stop_soon(self) -> None:
        if self.vm is not None:
            # Requests waiting on the guest fail now, not when this process is gone: their callers
            # (a client caught by a switchover) learn at once that the VM will not answer here.
            self.vm.cvmio.close()
        threading.Thread(target=self._stop.set, daemon=True).start()

    # -- the secure processor's dirty view ------------------------------------------------------------

    def _feed_sp(self, gfns: npt.NDArray[np.uint64]) -> None:
        """Hand a harvest to the secure processor's dirty view (in the platform process).

        In pieces below the RPC's blob limit: the first harvest of a large VM holds every populated page (8 bytes
        each).  A piece that fails leaves the whole harvest to be offered again (the SP takes repeats as no-ops).
        """
        if self.platform is None:
            raise UsageError("no platform connection: the secure processor cannot be told about dirty pages")
        for i in range(0, len(gfns), _FEED_GFNS):
            self.platform.dirty(self.spec.name, gfns[i : i + _FEED_GFNS])

    def require_dirty(self) -> DirtyViews:
        if self.dirty is None:
            raise UsageError("no running VM to track")
        return self.dirty

    # -- the secure processor's calls ---------------------------------------------------------------

    def hold_paused(self) -> None:
        """The SP holds the VM paused through the stop-and-copy: nobody but the SP's verdict resumes it."""
        vm = self._require_vm()
        with self._lock:
            if vm.state is not RunState.PAUSED:
                raise UsageError(f"the VM is {vm.state.value}, not paused")
            self._user_paused = True

    def capture_state(self) -> bytes:
        vm = self._require_vm()
        with self._lock:
            if vm.state is RunState.RUNNING:
                raise UsageError("capture: the VM is running")
            return vm.capture_state().to_bytes()

    def restore(self, handle: int, vcpu_state: bytes) -> str:
        """Build the VM from the state the SP imported, bound to ``handle`` (the guest the SP activated)."""
        with self._lock:
            if self.vm is not None or self.memory is None:
                raise UsageError("restore: this VM already runs")
            with trace.span("vm state parse"):
                state = VmState.from_bytes(vcpu_state)
            backend = BackendKind(self.spec.backend) if self.spec.backend else None
            prepared, self._prepared = self._prepared, None
            with trace.span(f"vm restore (prepared: {prepared is not None})"):
                self.vm = Vm.restore(state, self.memory, backend, prepared=prepared)
            self.dirty = DirtyViews(self.vm, feeds={"sp": self._feed_sp})
            self.dma = self._make_dma(self.memory)
            self.handle = handle
            self._user_paused = True
            self._restored = True
            self.state_note = "restored"
            return self.vm.state.value

    # -- standby ------------------------------------------------------------------------------------

    def make_spare_key(self) -> None:
        """While idle as a standby: the transfer key a paravisor will need (an RSA key pair, 0.1-0.3 s)."""
        with contextlib.suppress(CvmError, ValueError):
            self._spare_transfer = TransferKey.generate()

    def configure(self, vm_dir: Path) -> VmInfo:
        """Become the VM described by ``vm_dir/vm.json`` (the daemon moved this standby's socket there)."""
        with self._lock:
            if self.configured:
                raise UsageError("this VM process already runs a VM")
            self.spec = VmSpec.from_json((vm_dir / "vm.json").read_text())
            self.dir = vm_dir
            self.configured = True
        try:
            self.setup()
        except CvmError as exc:
            (vm_dir / "error").write_text(str(exc))
            threading.Thread(target=self._stop.set, daemon=True).start()
            raise
        return self.info()

    def _orphaned(self) -> bool:
        """A standby whose daemon went away has nothing left to wait for: its control connection closed, or
        the daemon died before it connected (this process was re-parented)."""
        if self.configured:
            return False
        if os.getppid() != self._parent:
            return True
        return bool(self._controls) and all(ep.closed for ep in self._controls)

    # -- main loop ----------------------------------------------------------------------------------

    def serve(self) -> None:
        path = self.dir / "control.sock"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        # The pid file before the socket listens: a daemon takes a standby as soon as it can connect, moving its
        # files and removing its directory, so a pid written after listen() could find the directory gone.
        (self.dir / "pid").write_text(str(os.getpid()))
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        server.listen(8)
        server.settimeout(0.2)
        try:
            while not self._stop.is_set():
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    if self._orphaned():
                        break
                    vm = self.vm
                    if vm is not None and vm.stop_reason is not None and vm.state is not RunState.STOPPED:
                        self.state_note = f"stopped: {vm.stop_reason.message}"
                    continue
                self._controls.append(Endpoint(conn, self.control_handler, name=f"vm-{self.spec.name}-control"))
        finally:
            server.close()
            with contextlib.suppress(FileNotFoundError):
                (self.dir / "control.sock").unlink()  # where it is now: a standby's socket moves
            self.close()

    def close(self) -> None:
        self._stop.set()
        for ep in self._controls:
            ep.close()
        if self.platform is not None:
            with contextlib.suppress(CvmError):
                self.platform.detach(self.spec.name)
            self.platform.close()
        if self.dma is not None:
            self.dma.close()
        if self._prepared is not None:
            self._prepared.discard()
        if self.vm is not None:
            self.vm.close()
        elif self.memory is not None:
            self.memory.close()


def _run_state(vm: Vm) -> RunState:
    return vm.state
