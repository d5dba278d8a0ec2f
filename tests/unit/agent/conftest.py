"""Fixtures for the migration agent tests: a pool CA, a frozen clock, a second (untrusted) emulated vendor."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from agent_harness import FakeClock, Host, make_host

from cvmotion.agent.pool import PoolAuthority, create_pool_ca
from cvmotion.firmware.vendor import Vendor

# Frozen for the whole run; the vendor certificates are minted from the wall clock and backdated one hour.
T0 = dt.datetime.now(dt.UTC).replace(microsecond=0)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture(scope="session")
def pool_ca(tmp_path_factory: pytest.TempPathFactory) -> PoolAuthority:
    return create_pool_ca(tmp_path_factory.mktemp("pool-ca"), name="test operator pool CA", now=T0)


@pytest.fixture(scope="session")
def rogue_vendor(tmp_path_factory: pytest.TempPathFactory) -> Vendor:
    """A second emulated vendor that no test trust store includes (a "non-genuine" chip maker)."""
    return Vendor.open(tmp_path_factory.mktemp("rogue-vendor"))


@pytest.fixture
def src(emulated_vendor: Vendor, tmp_path: Path, pool_ca: PoolAuthority, clock: FakeClock) -> Host:
    return make_host(emulated_vendor, tmp_path / "src", pool_ca, clock)


@pytest.fixture
def dst(emulated_vendor: Vendor, tmp_path: Path, pool_ca: PoolAuthority, clock: FakeClock) -> Host:
    return make_host(emulated_vendor, tmp_path / "dst", pool_ca, clock)
