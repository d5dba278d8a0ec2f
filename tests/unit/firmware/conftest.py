"""Fixtures for the emulated AMD-SP tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from fw_helpers import Guest, launch, new_sp

from cvmotion.firmware.device import SecureProcessor
from cvmotion.firmware.vendor import Vendor


@pytest.fixture
def sp(emulated_vendor: Vendor, tmp_path: Path) -> SecureProcessor:
    return new_sp(emulated_vendor, tmp_path / "host")


@pytest.fixture
def guest(sp: SecureProcessor) -> Guest:
    return launch(sp)
