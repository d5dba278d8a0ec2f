"""Shared fixtures: paths to the real AMD vectors and the built guest images."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from cvmotion.firmware.vendor import Vendor

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
