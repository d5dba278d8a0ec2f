"""Snapshot/restore: the workload continues exactly where it stopped, in this process and in another one."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from vmm_helpers import BACKENDS, VmFactory

from cvmotion.abi import kvm as abi
from cvmotion.vmm.backend import BackendKind
from cvmotion.vmm.kvm import VcpuFd
from cvmotion.vmm.kvm_backend import KvmMachineState
from cvmotion.vmm.snapshot import VmState, load_snapshot, save_snapshot
from cvmotion.vmm.vcpu import cpuid_entries
from cvmotion.vmm.vm import MachineConfig, RunState, Vm
from cvmotion.vmm.workloads import KvClient, MemdirtyModel, parse_heartbeat

pytestmark = pytest.mark.timeout(180)

HERE = Path(__file__).resolve().parent


def _beats(vm: Vm, count: int, since: int = 0) -> list[tuple[int, int, int]]:
    lines = vm.console.collect(r"^HB ", count, 60, since)
    assert len(lines) == count, vm.console.lines()[-5:]
    return [b for b in (parse_heartbeat(line) for line in lines) if b is not None]


def test_memdirty_continues_after_snapshot_file(vms: VmFactory, tmp_path: Path) -> None:
    vm = vms.boot("memdirty", "dirty_mib=1 rate=20000 hb_ms=100 seed=3", vcpus=2)
    before = _beats(vm, 2)
    vm.pause()
    state = vm.capture_state()
    stored = save_snapshot(tmp_path / "snap", state, vm.memory)
    assert 0 < stored < 4 << 20  # sparse: the working set, not the 16 MiB
    vm.close()
    if vms.backend is BackendKind.KVM:
        ap = state.machine.vcpus[1]
        assert getattr(ap, "mp_state", None) is abi.MpState.UNINITIALIZED  # waits for SIPI, captured all the same
    state2, memory = load_snapshot(tmp_path / "snap")
    assert state2 == state
    restored = vms.adopt(Vm.restore(state2, memory))
    assert restored.state is RunState.PAUSED
    restored.resume()
    after = _beats(restored, 2)
    model = MemdirtyModel(dirty_mib=1, seed=3)
    assert after[0][0] > before[-1][0]  # the sequence number continues: no reboot
    assert after[0][1] > before[-1][1]
    for _, writes, csum in before + after:
        assert model.checksum_at(writes) == csum  # continuation over the very same memory


def test_memdirty_halting_on_its_timer_continues_after_restore(vms: VmFactory) -> None:
    """``halt=1``: the guest sleeps on the LAPIC's TSC-deadline timer between writes (KVM's in-kernel LAPIC; the
    emulator has none and says it spins). The armed timer travels with the state: the restored guest wakes."""
    vm = vms.boot("memdirty", "dirty_mib=1 rate=400 hb_ms=100 seed=5 halt=1")
    before = _beats(vm, 2)
    mode = "halting between writes" if vms.backend is BackendKind.KVM else "no TSC-deadline timer"
    assert any(line.startswith(f"memdirty: {mode}") for line in vm.console.lines()), vm.console.lines()[:4]
    vm.pause()
    state = vm.capture_state()
    vm.discard()
    restored = vms.adopt(Vm.restore(state, vm.memory))
    restored.resume()
    after = _beats(restored, 3)
    model = MemdirtyModel(dirty_mib=1, seed=5)
    assert after[0][0] > before[-1][0]
    assert after[-1][1] > before[-1][1]  # writes go on: the restored timer fires
    for _, writes, csum in before + after:
        assert model.checksum_at(writes) == csum


def test_kvstore_keys_survive_restore_in_another_process(vms: VmFactory, tmp_path: Path) -> None:
    vm = vms.boot("kvstore", "slots=128 hb_ms=1000")
    assert vm.console.wait_for(r"^kvstore: ready", 30)
    kv = KvClient(vm.cvmio)
    acknowledged = {f"k{i}": f"v{i}-" + "x" * i for i in range(40)}
    for key, value in acknowledged.items():
        kv.put(key.encode(), value.encode())
    kv.delete(b"k7")
    del acknowledged["k7"]
    vm.pause()
    state = vm.capture_state()
    (tmp_path / "state").write_bytes(state.to_bytes())
    memfd = os.dup(vm.memfd)  # zero-copy handover: the child maps the very same memfd
    vm.close()
    try:
        out = subprocess.run(
            [sys.executable, str(HERE / "restore_child.py"), "--fd", str(memfd), "--state", str(tmp_path / "state"),
             "--get", *acknowledged, "k7"],
            pass_fds=[memfd], capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    finally:
        os.close(memfd)
    assert out.returncode == 0, out.stderr
    values = json.loads(out.stdout)["values"]
    assert values.pop("k7") is None
    assert values == acknowledged


def test_memdirty_continues_in_another_process_via_cli(backend: BackendKind, tmp_path: Path) -> None:
    from vmm_helpers import require_image

    require_image("memdirty")
    cli = [sys.executable, "-m", "cvmotion", "vm", "run", "--backend", backend.value]
    first = subprocess.run(
        [*cli, "--image", "memdirty", "--memory", "16M", "--cmdline", "dirty_mib=1 rate=20000 hb_ms=100 seed=9",
         "--seconds", "1", "--save", str(tmp_path / "snap")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    second = subprocess.run(
        [*cli, "--restore", str(tmp_path / "snap"), "--seconds", "1"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr
    before = [b for b in map(parse_heartbeat, first.stdout.splitlines()) if b]
    after = [b for b in map(parse_heartbeat, second.stdout.splitlines()) if b]
    assert before, first.stdout
    assert after, second.stdout
    assert after[0][0] > before[-1][0]
    model = MemdirtyModel(dirty_mib=1, seed=9)
    for _, writes, csum in before + after:
        assert model.checksum_at(writes) == csum


def test_state_bytes_round_trip(vms: VmFactory) -> None:
    vm = vms.boot("memdirty", "dirty_mib=1 hb_ms=100", vcpus=3)
    assert vm.console.collect(r"^HB ", 1, 30)
    vm.pause()
    state = vm.capture_state()
    assert VmState.from_bytes(state.to_bytes()) == state
    assert state.backend is vms.backend
    assert state.vcpus == 3


@pytest.mark.parametrize("matches", [True, False], ids=["prepared-used", "prepared-discarded"])
def test_restore_into_a_prepared_vm(vms: VmFactory, tmp_path: Path, matches: bool) -> None:
    """An incoming migration builds the VM before the state arrives; a prepared VM that does not match the
    state (here: another vCPU count) is discarded without closing the memory the restore needs."""
    vm = vms.boot("memdirty", "dirty_mib=1 rate=20000 hb_ms=100 seed=5")
    before = _beats(vm, 2)
    vm.pause()
    state = vm.capture_state()
    save_snapshot(tmp_path / "snap", state, vm.memory)
    vm.close()
    state2, memory = load_snapshot(tmp_path / "snap")
    prepared = Vm.prepare(MachineConfig(memory.size, 1 if matches else 2, vms.backend), memory)
    restored = vms.adopt(Vm.restore(state2, memory, prepared=prepared))
    assert (restored is prepared) is matches
    if not matches:
        assert prepared.state is RunState.STOPPED
    restored.resume()
    after = _beats(restored, 2)
    model = MemdirtyModel(dirty_mib=1, seed=5)
    assert after[0][0] > before[-1][0]
    for _, writes, csum in before + after:
        assert model.checksum_at(writes) == csum


@pytest.mark.parametrize("backend", BACKENDS[:1])  # CPUID tables are KVM's
@pytest.mark.parametrize("same", [True, False], ids=["same-cpuid", "other-cpuid"])
def test_restore_sets_the_cpuid_only_when_the_vcpu_holds_another(
    vms: VmFactory, monkeypatch: pytest.MonkeyPatch, same: bool
) -> None:
    """A prepared vCPU already holds the table the VMM set on it: a state with that same CPUID skips
    KVM_SET_CPUID2 (the dearest call of a restore) and the guest runs on; a state with another table gets it."""
    vm = vms.boot("memdirty", "dirty_mib=1 rate=400 hb_ms=100 seed=5 halt=1")
    before = _beats(vm, 2)
    vm.pause()
    state = vm.capture_state()
    vm.discard()
    assert isinstance(state.machine, KvmMachineState)
    if not same:
        entries = cpuid_entries(state.machine.vcpus[0].cpuid)
        leaf1 = next(e for e in entries if e.function == 1)
        leaf1.ebx = (leaf1.ebx & 0x00FFFFFF) | (7 << 24)  # another initial APIC ID
        vcpu = dataclasses.replace(state.machine.vcpus[0], cpuid=b"".join(bytes(e) for e in entries))
        state = dataclasses.replace(state, machine=dataclasses.replace(state.machine, vcpus=(vcpu,)))
    prepared = Vm.prepare(MachineConfig(vm.memory.size, 1, vms.backend), vm.memory)
    calls: list[int] = []
    set_cpuid2 = VcpuFd.set_cpuid2
    monkeypatch.setattr(VcpuFd, "set_cpuid2", lambda fd, entries: calls.append(fd.index) or set_cpuid2(fd, entries))
    restored = vms.adopt(Vm.restore(state, vm.memory, prepared=prepared))
    assert restored is prepared
    assert calls == ([] if same else [0])
    fd = restored.backend._vcpus[0].fd  # type: ignore[attr-defined]
    apic_id = next(e for e in fd.get_cpuid2() if e.function == 1).ebx >> 24
    assert apic_id == (0 if same else 7)
    if same:
        restored.resume()
        after = _beats(restored, 2)
        assert after[-1][1] > before[-1][1]  # the guest goes on writing on the vCPU that kept its table
