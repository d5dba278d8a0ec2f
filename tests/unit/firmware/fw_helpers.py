"""Helpers for the emulated AMD-SP tests: seeded chips over the session vendor, and a launched probe guest."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cvmotion.abi.guest_msg import GuestChannel
from cvmotion.abi.snp import Product
from cvmotion.firmware.chip import Chip
from cvmotion.firmware.device import GuestHandle, SecureProcessor
from cvmotion.firmware.kds import Kds
from cvmotion.firmware.keys import SeededRandom
from cvmotion.firmware.launch import PAGE_SIZE, PageType
from cvmotion.firmware.vendor import Vendor

PROBE_POLICY = 0x30000
_seed_counter = iter(range(1000, 1_000_000))


def new_sp(vendor: Vendor, data_dir: Path, product: Product = Product.GENOA, **chip_options: int) -> SecureProcessor:
    """A fresh chip (unique seed: the session vendor's fuse DB is shared) and its SP."""
    chip = Chip.create(data_dir, vendor, product, next(_seed_counter), **chip_options)
    return SecureProcessor(chip, endorsements=Kds(vendor), rng=SeededRandom(chip.chip_id, "sp"))


@dataclass
class Guest:
    sp: SecureProcessor
    handle: GuestHandle
    secrets: bytearray
    channels: dict[int, GuestChannel] = field(default_factory=dict)

    @property
    def vmpck0(self) -> bytes:
        return bytes(self.secrets[0x20:0x40])

    def channel(self, vmpck_id: int = 0) -> GuestChannel:
        """The guest's channel on VMPCK ``vmpck_id`` (one per key: it tracks the sequence numbers)."""
        if vmpck_id not in self.channels:
            start = 0x20 + 0x20 * vmpck_id
            self.channels[vmpck_id] = GuestChannel(bytes(self.secrets[start : start + 0x20]), vmpck_id=vmpck_id)
        return self.channels[vmpck_id]


def launch(sp: SecureProcessor, *, policy: int = PROBE_POLICY, host_data: bytes = bytes(32)) -> Guest:
    """LAUNCH_START -> one NORMAL page + SECRETS page -> LAUNCH_FINISH -> ACTIVATE."""
    handle = sp.launch_start(policy)
    sp.launch_update(handle, 0, PageType.NORMAL, b"probe".ljust(PAGE_SIZE, b"\0"))
    secrets = bytearray(PAGE_SIZE)
    sp.launch_update(handle, PAGE_SIZE, PageType.SECRETS, secrets)
    sp.launch_finish(handle, host_data=host_data)
    sp.activate(handle)
    return Guest(sp, handle, secrets)
