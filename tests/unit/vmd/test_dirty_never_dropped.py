"""The secure processor's dirty view only grows until it takes it: no call of the (hostile) daemon drops a bit.

A VM process's ``DirtyViews`` over a real (emulated-backend, never started) ``Vm``: the daemon may call
``start_dirty_tracking`` late, early or again and again; a page the VMM wrote (paravisor, cvm-io) or the guest
populated before any of that still reaches the SP, and the SP refuses the start token until it is exported.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import numpy as np
import numpy.typing as npt
import pytest

from cvmotion.abi.wire import BundleType, bundle_capacity
from cvmotion.errors import FirmwareError, UsageError
from cvmotion.firmware.launch import PAGE_SIZE, PageType
from cvmotion.firmware.vendor import Vendor
from cvmotion.ipc.rpc import Endpoint
from cvmotion.platformd.client import VmPlatformClient
from cvmotion.vmd import process as vm_process
from cvmotion.vmd.dirty import DirtyViews
from cvmotion.vmd.protocol import VmSpec
from cvmotion.vmm.backend import BackendKind
from cvmotion.vmm.images import guest_dir, load_image
from cvmotion.vmm.layout import MIB
from cvmotion.vmm.memory import GuestMemory
from cvmotion.vmm.vm import MachineConfig, Vm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "protocol"))
from mig_harness import MIGRATABLE_POLICY, new_sp  # noqa: E402

pytestmark = pytest.mark.timeout(60)

VMM_PAGE = 0x4A0  # a page the VMM writes (a cvm-io buffer, the paravisor's state): not in KVM's log


class _SpView:
    """The platform process's side: every harvest handed over (``vm_dirty``), drained by the firmware."""

    def __init__(self) -> None:
        self.parts: list[npt.NDArray[np.uint64]] = []

    def feed(self, gfns: npt.NDArray[np.uint64]) -> None:
        self.parts.append(gfns.copy())

    def drain(self) -> set[int]:
        out = {int(g) for part in self.parts for g in part}
        self.parts.clear()
        return out


@pytest.fixture
def vm() -> Iterator[Vm]:
    if not (guest_dir() / "memdirty.elf").is_file():
        pytest.skip("guest image memdirty not built (run `make guests`)")
    machine = Vm.create(MachineConfig(16 * MIB, 1, BackendKind.EMULATED), load_image("memdirty"), "dirty_mib=1")
    try:
        yield machine
    finally:
        machine.close()


def _sp_sees(views: DirtyViews, sp: _SpView) -> set[int]:
    """What the SP knows at its next fold: what was fed, plus a fresh harvest of its own (start token)."""
    fresh = {int(g) for g in views.take("sp", fresh=True)}
    return sp.drain() | fresh


def _populated(memory: GuestMemory) -> set[int]:
    return {g for gpa, length in memory.populated_ranges() for g in range(gpa >> 12, (gpa + length) >> 12)}


def test_a_vmm_write_before_tracking_starts_reaches_the_sp(vm: Vm) -> None:
    sp = _SpView()
    views = DirtyViews(vm, feeds={"sp": sp.feed})
    vm.memory.write(VMM_PAGE << 12, b"written by the paravisor before tracking started")
    views.start()
    assert VMM_PAGE in _sp_sees(views, sp)


def test_pages_populated_before_tracking_are_dirty_for_the_sp(vm: Vm) -> None:
    """Guest writes before the log was on were never logged: every populated page counts as written."""
    sp = _SpView()
    views = DirtyViews(vm, feeds={"sp": sp.feed})
    populated = _populated(vm.memory)
    assert populated
    views.start()
    assert populated <= _sp_sees(views, sp)


@pytest.mark.parametrize("restarts", [1, 3])
def test_restarting_tracking_drops_no_vmm_write(vm: Vm, restarts: int) -> None:
    sp = _SpView()
    views = DirtyViews(vm, feeds={"sp": sp.feed})
    views.start()
    _sp_sees(views, sp)  # the SP folded everything so far (round 0 exported it)
    vm.memory.write(VMM_PAGE << 12, b"a cvm-io reply written after round 0")
    for _ in range(restarts):
        views.start()  # the hostile daemon: "start_dirty_tracking" again
    assert _sp_sees(views, sp) == {VMM_PAGE}
    # The engine's baseline moved (its own business), yet its next harvest is not poisoned either.
    assert views.take("engine").tolist() == []


def test_a_failed_feed_keeps_the_harvest_for_the_next_take(vm: Vm) -> None:
    sp = _SpView()
    down = [True]

    def feed(gfns: npt.NDArray[np.uint64]) -> None:
        if down[0]:
            raise UsageError("platform busy")
        sp.feed(gfns)

    views = DirtyViews(vm, feeds={"sp": feed})
    down[0] = False
    views.start()
    sp.drain()
    vm.memory.write(VMM_PAGE << 12, b"x")
    down[0] = True
    with pytest.raises(UsageError):
        views.take("engine")
    down[0] = False
    assert VMM_PAGE in {int(g) for g in views.take("engine")}
    assert VMM_PAGE in sp.drain()


class _VmHardware:
    """The firmware's ``GuestHardware`` over a real Vm and the VM process's dirty views (as RemoteHardware)."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.sp_view = _SpView()
        self.views = DirtyViews(vm, feeds={"sp": self.sp_view.feed})

    @property
    def memory(self) -> GuestMemory:
        return self.vm.memory

    @property
    def gfn_limit(self) -> int:
        return max(r.gpa + r.size for r in self.vm.memory.layout.regions) >> 12

    def take_dirty(self, *, fresh: bool) -> npt.NDArray[np.uint64]:
        seen = self.sp_view.drain()
        if fresh:
            seen |= {int(g) for g in self.views.take("sp", fresh=True)}
        return np.asarray(sorted(seen), dtype=np.uint64)

    def hold_paused(self) -> npt.NDArray[np.uint64]:
        return self.take_dirty(fresh=True)

    def capture_state(self) -> tuple[bytes, bytes]:
        return b"vcpu", b"device"

    def capture_and_harvest(self) -> tuple[bytes, bytes, npt.NDArray[np.uint64]]:
        return b"vcpu", b"device", self.take_dirty(fresh=True)

    def pause_capture_harvest(self) -> tuple[bytes, bytes, npt.NDArray[np.uint64]]:
        return self.capture_and_harvest()

    def restore_state(self, vcpu_state: bytes, device_state: bytes, *, run: bool = False) -> None:
        raise AssertionError("a source never restores")


def test_the_firmware_refuses_the_start_token_over_an_erased_vmm_write(
    vm: Vm, emulated_vendor: Vendor, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The attack end to end at the firmware: round 0 exports everything, the paravisor then writes a page, the
    daemon re-starts tracking (which used to clear the VMM bitmap) and never sends the page again."""
    sp = new_sp(emulated_vendor, tmp_path_factory.mktemp("sp"))
    dst = new_sp(emulated_vendor, tmp_path_factory.mktemp("dst"))
    hw = _VmHardware(vm)
    handle = sp.launch_start(MIGRATABLE_POLICY)
    sp.launch_update(handle, 0x100000, PageType.NORMAL, bytes(vm.memory.view(0x100000, PAGE_SIZE)))
    sp.launch_finish(handle, host_data=bytes(32))
    sp.activate(handle)
    mig = sp.migration
    k_f = mig.ma_export_prepare(handle, bytes(16))
    ref = dst.migration.import_prepare(bytes(16), hw)  # type: ignore[arg-type]
    dst.migration.ma_import_install_forward_key(ref, k_f)
    mig.ma_export_install_backward_key(handle, dst.migration.ma_import_generate_backward_key(ref))
    vm.memory.write(VMM_PAGE << 12, b"the paravisor's state at boot")
    mig.export_start(handle, hw)  # type: ignore[arg-type]
    hw.views.start()
    out = memoryview(bytearray(bundle_capacity(64)))
    gfns = sorted(_populated(vm.memory))
    assert VMM_PAGE in gfns
    for i in range(0, len(gfns), 64):
        mig.export_memory(handle, 0, gfns[i : i + 64], out)
    mig.export_epoch_token(handle, 0)
    vm.memory.write(VMM_PAGE << 12, b"the paravisor's new state")
    hw.views.start()  # hostile: erase the dirty bit
    mig.export_pause(handle)
    final = hw.views.take("engine")  # what an engine would still send: nothing
    assert VMM_PAGE not in final.tolist()
    for kind in (BundleType.VCPU_STATE, BundleType.DEVICE_STATE, BundleType.MUTABLE_STATE):
        mig.export_state(handle, 0, kind)
    with pytest.raises(FirmwareError, match="dirty or unexported"):
        mig.export_start_token(handle, 0)
    # Sending the page makes the start token possible: the refusal was for that page alone.
    mig.export_memory(handle, 0, [VMM_PAGE], out)
    assert mig.export_start_token(handle, 0)


class _RecordingPlatform:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, object], bytes]] = []

    def call(
        self, method: str, args: dict[str, object], blob: bytes = b""
    ) -> tuple[dict[str, object], bytes, list[int]]:
        self.calls.append((method, args, blob))
        return {}, b"", []


def test_a_large_harvest_reaches_the_sp_in_pieces_below_the_rpc_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert 8 * vm_process._FEED_GFNS <= vm_process.MAX_BLOB  # a real piece fits one RPC blob
    monkeypatch.setattr(vm_process, "_FEED_GFNS", 4)
    proc = vm_process.VmProcess(VmSpec(name="big", memory=16 * MIB), tmp_path, str(tmp_path / "p.sock"))
    platform = _RecordingPlatform()
    proc.platform = VmPlatformClient(cast(Endpoint, platform))
    gfns = np.arange(10, dtype=np.uint64)
    proc._feed_sp(gfns)
    assert [m for m, _, _ in platform.calls] == ["vm_dirty"] * 3
    fed = np.concatenate([np.frombuffer(b, dtype="<u8") for _, _, b in platform.calls])
    assert fed.tolist() == gfns.tolist()
