"""Fixtures for VM tests: the backend parameter (KVM skipped where /dev/kvm is unusable) and a VM factory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from vmm_helpers import BACKENDS, VmFactory

from cvmotion.vmm.backend import BackendKind


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> BackendKind:
    kind: BackendKind = request.param
    return kind


@pytest.fixture
def vms(backend: BackendKind) -> Iterator[VmFactory]:
    factory = VmFactory(backend)
    yield factory
    factory.close()


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parents[3]
