"""Behaviour of a running VM, identical on both backends: boot, console, cvm-io, dirty tracking, pause, faults."""

from __future__ import annotations

import random
import re

import pytest
from vmm_helpers import KVM_OK, VmFactory

from cvmotion.abi.cvmio import BlobKind
from cvmotion.errors import UsageError, VcpuError
from cvmotion.vmm.backend import BackendKind, StopKind
from cvmotion.vmm.layout import GIB, MIB, PAGE_SIZE
from cvmotion.vmm.vm import Vm
from cvmotion.vmm.workloads import KvClient, MemdirtyModel, ProbeClient, parse_heartbeat

pytestmark = pytest.mark.timeout(120)

_READY = re.compile(r"desc=0x([0-9a-f]+) buf=0x([0-9a-f]+) stack=0x([0-9a-f]+)\.\.0x([0-9a-f]+) .*ud2=0x([0-9a-f]+)")


def heartbeats(vm: Vm, count: int, since: int = 0, timeout: float = 30) -> list[tuple[int, int, int]]:
    lines = vm.console.collect(r"^HB ", count, timeout, since)
    assert len(lines) == count, f"only {len(lines)} heartbeats: {vm.console.lines()[-5:]}"
    beats = [parse_heartbeat(line) for line in lines]
    assert all(b is not None for b in beats)
    return [b for b in beats if b is not None]


def probe_pages(vm: Vm) -> tuple[set[int], int]:
    """Pages the probe guest dirties by itself while serving (descriptor, buffer, stack), and ud2's address."""
    match = vm.console.wait_for(r"^probe: ready", 30)
    assert match is not None, vm.console.lines()
    m = _READY.search(match.string)
    assert m is not None
    desc, buf, stack_lo, stack_hi, ud2 = (int(g, 16) for g in m.groups())
    own = {desc >> 12, buf >> 12, (buf >> 12) + 1, *range(stack_lo >> 12, stack_hi >> 12)}
    return own, ud2


def test_memdirty_heartbeats_match_the_model(vms: VmFactory) -> None:
    vm = vms.boot("memdirty", "dirty_mib=1 rate=20000 hb_ms=100 seed=7")
    beats = heartbeats(vm, 3)
    model = MemdirtyModel(dirty_mib=1, seed=7)
    assert [seq for seq, _, _ in beats] == [0, 1, 2]
    for _, writes, csum in beats:
        assert model.checksum_at(writes) == csum
    assert beats[-1][1] > beats[0][1] > 0


def test_dirty_tracking_is_exact_guest_and_vmm_writes(vms: VmFactory) -> None:
    vm = vms.boot("probe")
    own, _ = probe_pages(vm)
    client = ProbeClient(vm.cvmio)
    vm.start_dirty_tracking()
    vm.harvest_dirty()
    targets = set(random.Random(5).sample(range(0x400, 0xF00), 24))
    client.touch(sorted(targets))
    vm.pause()
    dirty = vm.harvest_dirty().as_set()
    assert targets <= dirty
    assert dirty - targets <= own, f"unexpected dirty pages {sorted(dirty - targets - own)}"
    # the VMM copied the request into the buffer and wrote the descriptor back: tracked although KVM never saw it
    assert {min(own - set(range(0x100, 0x107))), 0x107} <= dirty
    assert vm.harvest_dirty().as_set() == set()  # paused: nothing new
    page = bytes([0xAB]) * PAGE_SIZE
    vm.write_pages([0x333], page)
    assert vm.harvest_dirty().as_set() == {0x333}
    vm.resume()
    assert client.read([0x333, min(targets)]) == [0xABABABAB, min(targets) ^ 0x5A5A5A5A]


@pytest.mark.kvm
@pytest.mark.skipif(not KVM_OK, reason="/dev/kvm unusable")
@pytest.mark.parametrize("initially_set", [False, True], ids=["write-protect-on-enable", "initially-set"])
def test_kvm_dirty_log_modes_agree(initially_set: bool) -> None:
    vms = VmFactory(BackendKind.KVM)
    try:
        vm = vms.boot("probe", dirty_log_initially_set=initially_set)
        own, _ = probe_pages(vm)
        populated = {g for gpa, n in vm.populated_ranges() for g in range(gpa >> 12, (gpa + n) >> 12)}
        vm.start_dirty_tracking()
        # The first harvest: every populated page (written before the log was on), never the whole slot.
        assert vm.harvest_dirty().as_set() <= populated | own
        ProbeClient(vm.cvmio).touch([0x500, 0x501, 0x9FF])
        vm.pause()
        assert vm.harvest_dirty().as_set() - own == {0x500, 0x501, 0x9FF}
        # Each log owns its bitmaps: the backend reuses its KVM_GET_DIRTY_LOG buffers, and a later harvest must not
        # change a log handed out earlier.
        vm.resume()
        ProbeClient(vm.cvmio).touch([0x600])
        vm.pause()
        kept = vm.backend.harvest_dirty()
        first = kept.as_set()
        assert 0x600 in first
        assert 0x700 not in first
        vm.resume()
        ProbeClient(vm.cvmio).touch([0x700])
        vm.pause()
        assert 0x700 in vm.backend.harvest_dirty()
        assert kept.as_set() == first
    finally:
        vms.close()


def test_kvstore_serves_requests(vms: VmFactory) -> None:
    vm = vms.boot("kvstore", "slots=64 hb_ms=1000")
    assert vm.console.wait_for(r"^kvstore: ready", 30)
    kv = KvClient(vm.cvmio)
    for i in range(12):
        kv.put(f"key-{i}".encode(), f"value-{i}".encode() * (i + 1))
    kv.put(b"key-3", b"replaced")
    assert kv.get(b"key-3") == b"replaced"
    assert kv.get(b"key-11") == b"value-11" * 12
    assert kv.delete(b"key-0") is True
    assert kv.delete(b"key-0") is False
    assert kv.get(b"key-0") is None
    assert kv.get(b"absent") is None
    stats = kv.stats()
    assert (stats.keys, stats.slots) == (11, 64)
    assert kv.blob(BlobKind.ATTESTATION_TOKEN) is None
    vm.cvmio.set_blob(BlobKind.ATTESTATION_TOKEN, b"eyJ.token" * 100)
    assert kv.blob(BlobKind.ATTESTATION_TOKEN) == b"eyJ.token" * 100
    with pytest.raises(UsageError):
        kv.put(b"k" * 65, b"v")


@pytest.mark.parametrize("image", ["memdirty", "kvstore"])
def test_pause_is_bounded_and_stops_the_guest(vms: VmFactory, image: str) -> None:
    vm = vms.boot(image, "dirty_mib=1 hb_ms=50" if image == "memdirty" else "hb_ms=50")
    assert vm.console.collect(r"^HB ", 1, 30)
    vm.start_dirty_tracking()
    latency = vm.pause()
    assert latency < 0.5  # bounded even while kvstore blocks in WAIT_REQUEST; bench/vmm_pause.py measures it
    vm.harvest_dirty()
    lines = vm.console.line_count
    assert vm.console.collect(r"^HB ", 1, 0.3, since=lines) == []
    assert vm.harvest_dirty().as_set() == set()
    vm.resume()
    assert vm.console.collect(r"^HB ", 1, 30, since=lines)


def test_triple_fault_names_the_rip(vms: VmFactory) -> None:
    vm = vms.boot("probe", "action=triple")
    _, ud2 = probe_pages(vm)
    stop = vm.wait(30)
    assert stop is not None
    assert stop.kind in (StopKind.TRIPLE_FAULT, StopKind.CPU_EXCEPTION)
    assert stop.rip == ud2
    with pytest.raises(VcpuError, match=f"last RIP {ud2:#x}") as info:
        vm.check()
    assert info.value.rip == ud2


def test_halt_with_interrupts_off_is_a_clean_stop(vms: VmFactory) -> None:
    vm = vms.boot("probe", "action=halt")
    stop = vm.wait(30)
    assert stop is not None
    assert stop.kind is StopKind.HALTED
    assert "interrupts disabled" in stop.message
    vm.check()  # not an error


def test_exit_port_stops_with_the_code(vms: VmFactory) -> None:
    vm = vms.boot("probe", "action=exit code=5")
    stop = vm.wait(30)
    assert stop is not None
    assert (stop.kind, stop.exit_code) == (StopKind.SHUTDOWN, 5)


def test_full_size_dc2as_v5_is_sparse(vms: VmFactory) -> None:
    vm = vms.boot("memdirty", "dirty_mib=1 hb_ms=100", memory=8 * GIB, vcpus=2)
    assert vm.console.collect(r"^HB ", 1, 30)
    assert [r.size for r in vm.memory.layout.regions] == [3 * GIB, 5 * GIB]
    assert vm.memory.populated_bytes() < 2 * MIB


@pytest.mark.slow
def test_full_size_ec96as_v5_is_sparse(vms: VmFactory) -> None:
    vm = vms.boot("memdirty", "dirty_mib=1 hb_ms=100", memory=672 * GIB, vcpus=96)
    assert vm.console.collect(r"^HB ", 1, 60)
    assert vm.memory.populated_bytes() < 2 * MIB
    vm.pause()
    assert len(vm.capture_state().machine.vcpus) == 96


def test_harvesting_while_the_guest_runs_loses_nothing(vms: VmFactory) -> None:
    import threading

    vm = vms.boot("probe")
    probe_pages(vm)
    client = ProbeClient(vm.cvmio)
    vm.start_dirty_tracking()
    seen: set[int] = set()
    done = threading.Event()

    def harvester() -> None:
        while not done.is_set():
            seen.update(vm.harvest_dirty().as_set())

    thread = threading.Thread(target=harvester)
    thread.start()
    rng = random.Random(11)
    written: set[int] = set()
    try:
        for _ in range(8):
            batch = rng.sample(range(0x400, 0xF00), 16)
            client.touch(batch)
            written.update(batch)
    finally:
        done.set()
        thread.join(10)
    vm.pause()
    seen.update(vm.harvest_dirty().as_set())
    assert written <= seen
