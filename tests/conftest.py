"""Shared fixtures: paths to the real AMD vectors, the emulated vendor, and one PostgreSQL server per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from cvmotion.firmware.vendor import Vendor
    from cvmotion.testing.postgres import PostgresServer

ROOT = Path(__file__).resolve().parent.parent
VECTORS = Path(__file__).resolve().parent / "vectors"


@pytest.fixture(scope="session")
def vectors_dir() -> Path:
    return VECTORS


@pytest.fixture(scope="session")
def emulated_vendor(tmp_path_factory: pytest.TempPathFactory) -> Vendor:
    """One emulated vendor for the session: its ARK/ASK/ASVK (RSA-4096) are made once per product, lazily."""
    from cvmotion.firmware.vendor import Vendor

    return Vendor.open(tmp_path_factory.mktemp("emulated-vendor"))


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the session; the test skips where its binaries (initdb, pg_ctl) are absent."""
    from cvmotion.testing.postgres import PostgresServer

    server = PostgresServer.find()
    if server is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) are not installed")
    with server:
        yield server
