"""Test harness: two emulated secure processors and fake VM hardware, for the firmware migration commands."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cvmotion.abi.guest_msg import GuestChannel
from cvmotion.abi.snp import PolicyFlag, Product
from cvmotion.abi.wire import BundleType, bundle_capacity
from cvmotion.firmware.chip import Chip
from cvmotion.firmware.device import GuestHandle, SecureProcessor
from cvmotion.firmware.kds import Kds
from cvmotion.firmware.keys import SeededRandom
from cvmotion.firmware.launch import PAGE_SIZE, PageType
from cvmotion.firmware.vendor import Vendor
from cvmotion.vmm.memory import GuestMemory

MIGRATABLE_POLICY = int(PolicyFlag.RESERVED_MBO | PolicyFlag.SMT | PolicyFlag.MIGRATE_MA)
MEMORY = 16 << 20
_seeds = iter(range(50_000, 1_000_000))


def new_sp(vendor: Vendor, data_dir: Path, product: Product = Product.GENOA) -> SecureProcessor:
    chip = Chip.create(data_dir, vendor, product, next(_seeds))
    return SecureProcessor(chip, endorsements=Kds(vendor), rng=SeededRandom(chip.chip_id, "sp"))


@dataclass
class FakeHardware:
    """A VM as the firmware sees it: memfd-backed memory, dirty logs, pause and state capture.

    Like the VM process, it keeps two dirty views fed by every guest write: one the engine harvests, one
    the firmware takes.
    """

    memory: GuestMemory
    paused: bool = False
    vcpu_state: bytes = b"vcpu-state"
    device_state: bytes = b"device-state"
    engine_dirty: set[int] = field(default_factory=set)
    sp_dirty: set[int] = field(default_factory=set)
    restored: tuple[bytes, bytes] | None = None
    running: bool = False
    fail_pause: bool = False
    # A write that lands while the SP seals after the switchover's harvest (hardware that broke the hold): made
    # just before the next fresh harvest.
    write_while_sealing: int | None = None
    fresh_harvests: int = 0  # fresh harvests the SP asked for (each one a round trip to the real hardware)

    @property
    def gfn_limit(self) -> int:
        return max(r.gpa + r.size for r in self.memory.layout.regions) >> 12

    def guest_write(self, gpa: int, data: bytes) -> None:
        """A write by the guest: lands in memory and in both dirty views."""
        if self.paused:
            raise AssertionError("a paused guest cannot write")
        self.memory.write(gpa, data)
        gfns = range(gpa >> 12, ((gpa + len(data) - 1) >> 12) + 1)
        self.engine_dirty.update(gfns)
        self.sp_dirty.update(gfns)

    def harvest(self) -> list[int]:
        """The engine's harvest."""
        out = sorted(self.engine_dirty)
        self.engine_dirty.clear()
        return out

    def take_dirty(self, *, fresh: bool) -> npt.NDArray[np.uint64]:
        self.fresh_harvests += fresh
        if fresh and self.write_while_sealing is not None:
            gpa, self.write_while_sealing = self.write_while_sealing, None
            self.memory.write(gpa, b"written while the SP sealed")
            self.sp_dirty.add(gpa >> 12)
        out = np.asarray(sorted(self.sp_dirty), dtype=np.uint64)
        self.sp_dirty.clear()
        return out

    def hold_paused(self) -> npt.NDArray[np.uint64]:
        if not self.paused:
            raise RuntimeError("VM is not paused")
        return self.take_dirty(fresh=True)

    def capture_state(self) -> tuple[bytes, bytes]:
        return self.vcpu_state, self.device_state

    def capture_and_harvest(self) -> tuple[bytes, bytes, npt.NDArray[np.uint64]]:
        vcpu, device = self.capture_state()
        return vcpu, device, self.take_dirty(fresh=True)

    def pause_capture_harvest(self) -> tuple[bytes, bytes, npt.NDArray[np.uint64]]:
        """The VMM pauses the vCPUs, then the capture and harvest (``fail_pause``: the pause fails)."""
        if self.fail_pause:
            raise RuntimeError("the VMM could not pause the vCPUs")
        self.paused = True
        vcpu, device = self.capture_state()
        sealing, self.write_while_sealing = self.write_while_sealing, None
        dirty = self.take_dirty(fresh=True)
        self.write_while_sealing = sealing
        return vcpu, device, dirty

    def restore_state(self, vcpu_state: bytes, device_state: bytes, *, run: bool = False) -> None:
        self.restored = (vcpu_state, device_state)
        self.running = run


@dataclass
class LaunchedGuest:
    sp: SecureProcessor
    handle: GuestHandle
    hw: FakeHardware
    channel: GuestChannel


def launch_guest(sp: SecureProcessor, *, policy: int = MIGRATABLE_POLICY) -> LaunchedGuest:
    hw = FakeHardware(GuestMemory(MEMORY))
    handle = sp.launch_start(policy)
    image = b"cvmotion test image".ljust(PAGE_SIZE, b"\0")
    hw.memory.write(0x100000, image)
    sp.launch_update(handle, 0x100000, PageType.NORMAL, image)
    secrets = hw.memory.view(0x1000, PAGE_SIZE)
    sp.launch_update(handle, 0x1000, PageType.SECRETS, secrets)
    sp.launch_finish(handle, host_data=bytes(32))
    sp.activate(handle)
    return LaunchedGuest(sp, handle, hw, GuestChannel(bytes(secrets[0x20:0x40])))


Bundle = tuple[int, bytes]  # (stream, bytes)


@dataclass
class Session:
    """One migration between two SPs driven by an honest engine; tests may tamper with ``bundles``."""

    src: LaunchedGuest
    dst_sp: SecureProcessor
    session_id: bytes = field(default_factory=lambda: os.urandom(16))
    dst_hw: FakeHardware = field(default_factory=lambda: FakeHardware(GuestMemory(MEMORY)))
    ref: int = 0
    bundles: list[Bundle] = field(default_factory=list)

    def setup(self) -> None:
        mig_src, mig_dst = self.src.sp.migration, self.dst_sp.migration
        k_f = mig_src.ma_export_prepare(self.src.handle, self.session_id)
        self.ref = mig_dst.import_prepare(self.session_id, self.dst_hw)
        mig_dst.ma_import_install_forward_key(self.ref, k_f)
        mig_src.ma_export_install_backward_key(self.src.handle, mig_dst.ma_import_generate_backward_key(self.ref))
        mig_src.export_start(self.src.handle, self.src.hw)
        self.bundles.append((0, mig_src.export_immutable(self.src.handle, 0)))

    def send_pages(self, gfns: list[int], streams: int = 1, per_bundle: int = 64) -> None:
        mig = self.src.sp.migration
        out = bytearray(bundle_capacity(per_bundle))
        for n, i in enumerate(range(0, len(gfns), per_bundle)):
            stream = n % streams
            length = mig.export_memory(self.src.handle, stream, gfns[i : i + per_bundle], memoryview(out))
            self.bundles.append((stream, bytes(out[:length])))

    def epoch(self, stream: int = 0) -> None:
        self.bundles.append((stream, self.src.sp.migration.export_epoch_token(self.src.handle, stream)))

    def switchover(self, final_gfns: list[int] | None = None, *, one_call: bool = False) -> None:
        """Pause, send ``final_gfns`` (default: what the engine's harvest says), then the state bundles and the
        start token: one command each, or ``one_call``: ``export_final`` (as the daemon does)."""
        mig = self.src.sp.migration
        self.src.hw.paused = True
        mig.export_pause(self.src.handle)
        final = self.src.hw.harvest() if final_gfns is None else final_gfns
        if final:
            self.send_pages(final)
        if one_call:
            self.bundles += [(0, b) for b in mig.export_final(self.src.handle, 0)]
            return
        for kind in (BundleType.VCPU_STATE, BundleType.DEVICE_STATE, BundleType.MUTABLE_STATE):
            self.bundles.append((0, mig.export_state(self.src.handle, 0, kind)))
        self.bundles.append((0, mig.export_start_token(self.src.handle, 0)))

    def run_precopy(self, rng: random.Random, rounds: int = 2) -> None:
        """Round 0 sends every populated page; then the guest writes and each round sends the dirty set."""
        self.setup()
        populated = [
            g for gpa, length in self.src.hw.memory.populated_ranges() for g in range(gpa >> 12, (gpa + length) >> 12)
        ]
        self.src.hw.harvest()
        self.send_pages(populated, streams=2)
        self.epoch()
        for _ in range(rounds):
            for _ in range(8):
                self.src.hw.guest_write(rng.randrange(0, 4 << 20) & ~7, rng.randbytes(8))
            self.send_pages(self.src.hw.harvest(), streams=2)
            self.epoch()

    def deliver(self, bundles: list[Bundle] | None = None, on_error: Callable[[Exception], None] | None = None) -> None:
        mig = self.dst_sp.migration
        for _stream, data in self.bundles if bundles is None else bundles:
            try:
                mig.import_bundle(self.ref, data)
            except Exception as exc:
                if on_error is None:
                    raise
                on_error(exc)
                return


def fill_guest(guest: LaunchedGuest, rng: random.Random) -> bytes:
    """Write a recognisable working set, including a canary and some all-zero pages; returns the canary."""
    canary = b"CANARY-" + rng.randbytes(16).hex().encode()
    for gfn in range(0x200, 0x300):
        guest.hw.guest_write(gfn << 12, rng.randbytes(PAGE_SIZE))
    guest.hw.guest_write(0x250 << 12, canary)
    guest.hw.guest_write(0x310 << 12, bytes(PAGE_SIZE))  # populated but zero: travels as a flag
    return canary


def filled_session(vendor: Vendor, data_dir: Path, seed: int) -> Session:
    """A launched guest with a working set (``fill_guest``) and a fresh destination SP: one migration to drive."""
    src = launch_guest(new_sp(vendor, data_dir / "a"))
    fill_guest(src, random.Random(seed))
    return Session(src=src, dst_sp=new_sp(vendor, data_dir / "b"))
