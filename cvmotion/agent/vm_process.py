"""agent layer: the VM process — one per VM (like one QEMU per VM), the emulated hardware of one CVM.

It owns the VM (vCPUs through KVM or unicorn, guest memory as a memfd, devices) and, later, the CVM's
paravisor.  It is *hardware* in the trust model: guest plaintext lives here.  It talks to:

- the host's platform process (secure processor + migration agent), as hardware talks to the AMD-SP:
  it hands over the memfd (the SP reads and writes guest memory directly, as the real one does), asks
  ``can_run`` before any vCPU runs, and answers the SP's calls during migration (its dirty view,
  "hold paused", vCPU state capture and restore);
- the host daemon (untrusted) through ``control.sock``: run control, dirty logs *as page numbers*,
  populated ranges, the serial console, cvm-io requests (device I/O is shared memory by design) and guest
  message relay.  Nothing it returns to the daemon holds guest-private memory or keys.

The process outlives the daemon: a restarted daemon re-attaches through ``control.sock``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cvmotion.abi.cvmio import BlobKind
from cvmotion.abi.gfns import sorted_union
from cvmotion.attestation.client import AttestationClient, KeyReleaseClient
from cvmotion.attestation.keyrelease import TransferKey
from cvmotion.attestation.paravisor import Paravisor
from cvmotion.errors import CvmError, UsageError
from cvmotion.ipc.rpc import MAX_BLOB, Call, Endpoint, Reply, connect_unix
from cvmotion.vmm.backend import BackendKind
from cvmotion.vmm.devices.dma import DmaConfig, DmaDevice
from cvmotion.vmm.images import load_image
from cvmotion.vmm.kvm_backend import install_kick_handler
from cvmotion.vmm.loader import BOOT_INFO_END, BOOT_INFO_GPA, SECRETS_PAGE_GPA
from cvmotion.vmm.memory import GuestMemory
from cvmotion.vmm.snapshot import VmState
from cvmotion.vmm.vm import MachineConfig, RunState, Vm

__all__ = ["SECRETS_PAGE_GPA", "DirtyViews", "VmProcess", "VmSpec", "main"]

PAGE = 4096
_THROTTLE_PERIOD = 0.05  # auto-converge: each 50 ms window, the vCPUs sleep pct% of it
_TOKEN_REFRESH = 300.0  # the paravisor renews its token well before the service's lifetime runs out
_FEED_GFNS = MAX_BLOB // 16  # GFNs per vm_dirty call: half the RPC's blob limit


@dataclass(frozen=True, slots=True)
class VmSpec:
    """What the daemon asks for: written to ``vm.json`` in the VM's directory."""

    name: str
    memory: int
    vcpus: int = 1
    image: str = ""
    cmdline: str = ""
    backend: str | None = None
    mode: str = "launch"  # "launch" boots the image; "incoming" waits for a migration
    attestation_url: str | None = None  # where the paravisor attests (None: no paravisor attestation)
    key_release_url: str | None = None  # optional relying party that releases the guest's data key
    key_name: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> VmSpec:
        data = json.loads(text)
        return cls(**data)


class DirtyViews:
    """Two consumers of one hardware dirty log: the migration engine and the secure processor.

    Every harvest of the KVM (or unicorn) log feeds both views, so the firmware learns about every write the
    engine learns about, and vice versa — the firmware's "exported and clean" check stays exact.  A consumer
    with a ``feeds`` callable is handed each harvest at once (the SP: its view lives in the platform process,
    so folding it before each bundle is local there); the harvest reaches it before the harvesting consumer
    has it, so the engine can never ask the SP to export a page the SP does not yet know is dirty.

    The SP's view only grows until the SP takes it: no call the (untrusted) daemon can make drops a bit.
    ``start`` turns the hardware log on once and then only moves the engine's baseline (its harvest still
    feeds the SP); a harvest the SP could not be handed is kept and offered again with the next one.
    """

    CONSUMERS = ("engine", "sp")

    def __init__(self, vm: Vm, feeds: dict[str, Callable[[npt.NDArray[np.uint64]], object]] | None = None) -> None:
        self._vm = vm
        self._lock = threading.Lock()
        self._pending: dict[str, list[npt.NDArray[np.uint64]]] = {c: [] for c in self.CONSUMERS}
        self._feeds = dict(feeds or {})
        self._unfed: list[npt.NDArray[np.uint64]] = []  # harvested, but a feed failed: nobody has these yet
        self.tracking = False

    def start(self) -> None:
        """Dirty tracking on (the first call; the log then stays on) and a new baseline for the engine.

        Clears nothing: the first harvest holds every populated page (``Vm.start_dirty_tracking``), and the
        harvest made here reaches the SP before the engine's copy is dropped.
        """
        with self._lock:
            if not self.tracking:
                self._vm.start_dirty_tracking()
                self.tracking = True
        self.take("engine")

    def take(self, consumer: str, *, fresh: bool = True) -> npt.NDArray[np.uint64]:
        with self._lock:
            if not self.tracking:
                raise UsageError("dirty tracking has not been started")
            parts = self._pending[consumer]
            if fresh:
                new = self._vm.harvest_dirty().gfns()
                if self._unfed:
                    new = sorted_union(new, *self._unfed)
                if len(new):
                    # Keep the harvest until every feed took it: a feed that raises leaves it for the next take.
                    self._unfed = [new]
                    for other, pending in self._pending.items():
                        if other == consumer:
                            continue
                        feed = self._feeds.get(other)
                        if feed is not None:
                            feed(new)  # raises if the other consumer cannot be told: nobody gets this harvest now
                        else:
                            pending.append(new)
                    self._unfed = []
                    parts.append(new)
            self._pending[consumer] = []
        if not parts:
            return np.zeros(0, dtype=np.uint64)
        return sorted_union(*parts)


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
        return self._proc.daemon_call("guest_request", {"handle": self._proc.handle}, message)[1]

    def endorsements(self) -> bytes | None:
        return self._proc.daemon_call("ext_certs", {})[1] or None

    def publish_token(self, token: bytes) -> None:
        vm = self._proc.vm
        if vm is not None:
            vm.cvmio.set_blob(BlobKind.ATTESTATION_TOKEN, token)

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        with contextlib.suppress(CvmError):
            self._proc.daemon_call("event", {"type": kind, "data": data, "vm": self._proc.spec.name})


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
        self.platform: Endpoint | None = None
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

    def daemon_call(self, method: str, args: dict[str, Any], blob: bytes = b"") -> tuple[dict[str, Any], bytes]:
        """Call the host daemon over the newest live control connection (it relays for the paravisor)."""
        for endpoint in reversed(self._controls):
            if not endpoint.closed:
                result, data, _ = endpoint.call(method, args, blob, timeout=30)
                return result, data
        raise UsageError("no host daemon is connected")

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
        if spec.mode == "launch":
            self.vm = Vm.create(MachineConfig(spec.memory, spec.vcpus, backend), load_image(spec.image), spec.cmdline)
            self.memory = self.vm.memory
            self.dirty = DirtyViews(self.vm, feeds={"sp": self._feed_sp})
            self.dma = self._make_dma(self.memory)
        elif spec.mode == "incoming":
            self.memory = GuestMemory(spec.memory, name=f"cvmotion-{spec.name}")
            # Built now, filled at activation: ~10 ms less inside the downtime (Vm.prepare). If it cannot be
            # built, activation builds it and reports why.
            with contextlib.suppress(CvmError, OSError):
                self._prepared = Vm.prepare(MachineConfig(spec.memory, spec.vcpus, backend), self.memory)
        else:
            raise UsageError(f"unknown VM mode {spec.mode!r}")
        self.platform = connect_unix(self.platform_socket, self._serve_platform, name=f"vm-{spec.name}->platform")
        self.platform.call(
            "vm_attach", {"name": spec.name, "memory": spec.memory, "mode": spec.mode}, fds=[self.memory.fd]
        )
        self.platform.on_close(self._stop.set)
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
        result, _, _ = self.platform.call("can_run", {"handle": self.handle})
        return bool(result["can_run"])

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
            return vm.pause()

    def resume(self) -> None:
        with self._lock:
            vm = self._require_vm()
            if not self._may_run():
                raise UsageError("the secure processor does not let this guest run (migration in progress)")
            self._user_paused = False
            vm.resume()
            if self.dma is not None:
                self.dma.start()
            self.state_note = "running"
            first_run_here = self._restored
            self._restored = False
        if first_run_here:
            # Arrived by live migration: the paravisor re-attests on this chip right after resume.
            threading.Thread(
                target=self._run_paravisor, args=(True, time.time()), name="paravisor", daemon=True
            ).start()

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

    def info(self) -> dict[str, Any]:
        vm = self.vm
        return {
            "name": self.spec.name,
            "pid": os.getpid(),
            "mode": self.spec.mode,
            "state": vm.state.value if vm else "incoming",
            "handle": self.handle,
            "memory": self.spec.memory,
            "vcpus": self.spec.vcpus,
            "backend": vm.backend_kind.value if vm else self.spec.backend,
            "image": self.spec.image,
            "stop_reason": vm.stop_reason.message if vm and vm.stop_reason else None,
            "console_lines": vm.console.line_count if vm else 0,
            "throttle": self._throttle_pct,
            "secrets_gpa": SECRETS_PAGE_GPA,
        }

    # -- the daemon's calls -------------------------------------------------------------------------

    def _serve_control(self, call: Call) -> Reply:
        a = call.args
        m = call.method
        if m == "info":
            return Reply(self.info())
        if m == "configure":
            return Reply(self.configure(Path(str(a["dir"]))))
        if m == "attestation":
            current = self.paravisor.current if self.paravisor else None
            return Reply(
                {}
                if current is None
                else {
                    "token": current.token,
                    "jti": current.jti,
                    "chip_id": current.chip_id,
                    "tcb": current.tcb,
                    "platform": current.platform,
                    "issued_at": current.issued_at,
                    "reason": current.reason,
                    "data_key": self.paravisor.data_key_fingerprint() if self.paravisor else None,
                }
            )
        if m == "launch_ranges":
            return Reply({"ranges": self.launch_ranges()})
        if m == "bind":
            self.handle = int(a["handle"])
            return Reply()
        if m == "start":
            self.start()
            return Reply()
        if m == "pause":
            return Reply({"latency": self.pause()})
        if m == "resume":
            self.resume()
            return Reply()
        if m == "start_dirty_tracking":
            with self._lock:  # the emulated backend pauses to add its hook: never across the SP's hold
                self._require_dirty().start()
            return Reply()
        if m == "harvest_dirty":
            gfns = self._require_dirty().take("engine")
            return Reply({"count": len(gfns)}, gfns.astype("<u8").tobytes())
        if m == "populated_ranges":
            assert self.memory is not None
            return Reply({"ranges": [list(r) for r in self.memory.populated_ranges()]})
        if m == "console":
            vm = self._require_vm()
            since = int(a.get("since", 0))
            count = vm.console.line_count
            history = vm.console.lines()
            first = count - len(history)
            return Reply({"lines": history[max(0, since - first) :], "next": count})
        if m == "cvmio":
            vm = self._require_vm()
            return Reply({}, vm.cvmio.submit(call.blob, float(a.get("timeout", 5.0))))
        if m == "throttle":
            self.set_throttle(int(a["pct"]))
            return Reply()
        if m == "stop":
            if self.vm is not None:
                # Requests waiting on the guest fail now, not when this process is gone: their callers
                # (a client caught by a switchover) learn at once that the VM will not answer here.
                self.vm.cvmio.close()
            threading.Thread(target=self._stop.set, daemon=True).start()
            return Reply()
        raise UsageError(f"unknown VM control method {m!r}")

    def _feed_sp(self, gfns: npt.NDArray[np.uint64]) -> None:
        """Hand a harvest to the secure processor's dirty view (in the platform process).

        In pieces below the RPC's blob limit: the first harvest of a large VM holds every populated page (8 bytes
        each).  A piece that fails leaves the whole harvest to be offered again (the SP takes repeats as no-ops).
        """
        if self.platform is None:
            raise UsageError("no platform connection: the secure processor cannot be told about dirty pages")
        for i in range(0, len(gfns), _FEED_GFNS):
            self.platform.call("vm_dirty", {"name": self.spec.name}, gfns[i : i + _FEED_GFNS].astype("<u8").tobytes())

    def _require_dirty(self) -> DirtyViews:
        if self.dirty is None:
            raise UsageError("no running VM to track")
        return self.dirty

    # -- the secure processor's calls ---------------------------------------------------------------

    def _serve_platform(self, call: Call) -> Reply:
        m = call.method
        if m == "sp_take_dirty":
            gfns = self._require_dirty().take("sp", fresh=bool(call.args.get("fresh")))
            return Reply({}, gfns.astype("<u8").tobytes())
        if m == "sp_hold_paused":
            vm = self._require_vm()
            with self._lock:
                if vm.state is not RunState.PAUSED:
                    raise UsageError(f"the VM is {vm.state.value}, not paused")
                self._user_paused = True
            return Reply()
        if m == "sp_capture_state":
            vm = self._require_vm()
            with self._lock:
                if vm.state is RunState.RUNNING:
                    raise UsageError("capture: the VM is running")
                state = vm.capture_state().to_bytes()
            return Reply({"vcpu_len": len(state)}, state)
        if m == "sp_restore_state":
            return Reply(self._restore(call))
        raise UsageError(f"unknown platform method {m!r}")

    def _restore(self, call: Call) -> dict[str, Any]:
        with self._lock:
            if self.vm is not None or self.memory is None:
                raise UsageError("restore: this VM already runs")
            vcpu_len = int(call.args["vcpu_len"])
            state = VmState.from_bytes(call.blob[:vcpu_len])
            backend = BackendKind(self.spec.backend) if self.spec.backend else None
            prepared, self._prepared = self._prepared, None
            self.vm = Vm.restore(state, self.memory, backend, prepared=prepared)
            self.dirty = DirtyViews(self.vm, feeds={"sp": self._feed_sp})
            self.dma = self._make_dma(self.memory)
            self.handle = int(call.args["handle"])
            self._user_paused = True
            self._restored = True
            self.state_note = "restored"
            return {"state": self.vm.state.value}

    # -- standby ------------------------------------------------------------------------------------

    def make_spare_key(self) -> None:
        """While idle as a standby: the transfer key a paravisor will need (an RSA key pair, 0.1-0.3 s)."""
        with contextlib.suppress(CvmError, ValueError):
            self._spare_transfer = TransferKey.generate()

    def configure(self, vm_dir: Path) -> dict[str, Any]:
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
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        server.listen(8)
        server.settimeout(0.2)
        (self.dir / "pid").write_text(str(os.getpid()))
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
                self._controls.append(Endpoint(conn, self._serve_control, name=f"vm-{self.spec.name}-control"))
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
                self.platform.call("vm_detach", {"name": self.spec.name}, timeout=2)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cvmotion-vm", description="one cvmotion VM (started by the host daemon)")
    parser.add_argument("--dir", required=True, type=Path, help="the VM's directory (vm.json, control.sock)")
    parser.add_argument("--platform", required=True, help="the platform process's socket")
    parser.add_argument("--standby", action="store_true", help="start without a VM; wait for `configure`")
    parser.add_argument("--parent", type=int, help="a standby's daemon PID: it exits once that is not its parent")
    args = parser.parse_args(argv)
    if args.standby:
        proc = VmProcess(VmSpec(name="standby", memory=0), args.dir, args.platform)
        proc.configured = False
        if args.parent is not None:
            proc._parent = args.parent
    else:
        proc = VmProcess(VmSpec.from_json((args.dir / "vm.json").read_text()), args.dir, args.platform)
    signal.signal(signal.SIGTERM, lambda *_: proc._stop.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the daemon's terminal going away must not kill the guest
    # vCPU threads are kicked out of KVM_RUN with a signal whose handler only the main thread may install;
    # an incoming VM is created later, from an RPC thread, when the firmware hands over its state.
    install_kick_handler()
    if args.standby:
        threading.Thread(target=proc.make_spare_key, name="spare-key", daemon=True).start()
    else:
        try:
            proc.setup()
        except CvmError as exc:
            print(f"cvmotion-vm: {exc}", file=sys.stderr)
            (args.dir / "error").write_text(str(exc))
            return 1
    proc.serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
