"""Fixtures for the process-level migration tests: one vendor and pool CA per run, hosts per module, a VM per test.

Everything is real: host daemons, platform processes and VM processes on loopback.  The VMs run on KVM where
/dev/kvm is usable and on the emulated backend otherwise, so the adversary, fault and canary suites run
everywhere; ``CVMOTION_E2E_BACKEND=emulated`` (or ``kvm``) forces one.  All modules share one world of hosts.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from mig_world import UPDATED_SNP, Victim, World

from cvmotion.vmm.kvm import kvm_usable

BACKEND_ENV = "CVMOTION_E2E_BACKEND"


def e2e_backend() -> str:
    """``$CVMOTION_E2E_BACKEND`` if set, else KVM where /dev/kvm is usable, else the emulated backend."""
    forced = os.environ.get(BACKEND_ENV, "")
    if forced:
        if forced not in ("kvm", "emulated"):
            raise pytest.UsageError(f"{BACKEND_ENV}={forced!r}: use kvm or emulated")
        return forced
    return "kvm" if kvm_usable()[0] else "emulated"


@pytest.fixture(scope="session")
def mig_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mig-e2e")


def _world(root: Path, mig_root: Path, **start: int) -> Iterator[World]:
    w = World(root, mig_root / "vendor", mig_root / "pool-ca", backend=e2e_backend()).start(**start)
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
