"""Live migration while the DMA load device writes guest memory (``vmm.devices.dma``) far faster than guest code
can: every page it wrote before the pause reaches the destination (the firmware's start token demands it), its
writes stop while the VM is paused, and the guest's own memory comes out intact."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from mig_world import DIRTY_MIB, Victim, World

pytestmark = pytest.mark.timeout(180)

A, B = "host-a", "host-b"
# memdirty's working set is 0x400000 + 2 MiB; the device gets 4 MiB above it, at 200 MiB/s.
DMA = "dma_base=0x800000 dma_mib=4 dma_rate=200"


@pytest.fixture
def dma_victim(attack_world: World) -> Iterator[Victim]:
    seed = 0xD3A
    cmdline = f"dirty_mib={DIRTY_MIB} rate=20000 hb_ms=100 seed={seed} {DMA}"
    victim = attack_world.new_vm("dma-victim", seed=seed, cmdline=cmdline)
    try:
        yield victim
    finally:
        attack_world.drop_vm(victim)


def test_migration_under_dma_load_completes_with_memory_intact(attack_world: World, dma_victim: Victim) -> None:
    world = attack_world
    world.proxy.reset()
    info = world.migrate(dma_victim)
    assert info["status"] == "completed", info
    assert info["ram"]["transferred"] > 4 << 20  # the device's window went at least once
    world.finish(dma_victim, expect_host=B)
