"""Fixtures for the process-level migration tests: one vendor and pool CA per run, hosts per module, a VM per test.

Everything is real: host daemons, platform processes and KVM VM processes on loopback.  Skipped cleanly
where /dev/kvm is unusable.  All modules share one world of hosts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from mig_world import UPDATED_SNP, Victim, World

from cvmotion.vmm.kvm import kvm_usable


@pytest.fixture(scope="session")
def mig_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not kvm_usable():
        pytest.skip("/dev/kvm is not usable here")
    return tmp_path_factory.mktemp("mig-e2e")


def _world(root: Path, mig_root: Path, **start: int) -> Iterator[World]:
    w = World(root, mig_root / "vendor", mig_root / "pool-ca").start(**start)
    try:
        yield w
    finally:
        w.close()


@pytest.fixture(scope="session")
def attack_world(mig_root: Path) -> Iterator[World]:
    """host-a and host-b (behind the proxy) for the whole run: attacks leave them as they found them, and a
    fault test's killed daemon comes back on the same data directory and ports."""
    # Patched firmware (SNP SPL above the factory default) on host-a and host-b; host-c keeps the old one.
    yield from _world(mig_root / "hosts", mig_root, snp_spl=UPDATED_SNP)


@pytest.fixture
def fault_world(attack_world: World) -> World:
    return attack_world


def seed_of(request: pytest.FixtureRequest) -> int:
    """A seed and a VM name unique to the test (names are 1-63 of [a-z0-9-])."""
    return int(hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:6], 16)


@pytest.fixture
def victim(attack_world: World, request: pytest.FixtureRequest) -> Iterator[Victim]:
    seed = seed_of(request)
    v = attack_world.new_vm(f"v{seed:06x}", seed=seed)
    try:
        yield v
    finally:
        attack_world.drop_vm(v)
