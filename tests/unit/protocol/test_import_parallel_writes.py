"""The destination writes a verified bundle's pages outside the firmware's lock (the streams' imports overlap their
writes), and everything that certifies memory — an epoch token, the start token — or tears the import down waits
for the writes in flight.  The hardware here blocks a chosen write until the test lets it go."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from mig_harness import MEMORY, FakeHardware, Session, launch_guest, new_sp

from cvmotion.abi import wire
from cvmotion.abi.wire import bundle_capacity
from cvmotion.errors import DeviceError, IntegrityError
from cvmotion.firmware.vendor import Vendor
from cvmotion.vmm.memory import GuestMemory

PAGE = wire.PAGE_SIZE
WAIT = 10.0  # seconds: the bound on every wait for something that must happen
NOT_YET = 0.2  # seconds: how long a step that must stay blocked is watched


@dataclass
class _GatedMemory:
    """Guest memory whose ``write_pages`` of a chosen first GFN blocks until ``release`` (or fails)."""

    memory: GuestMemory
    gate_gfn: int | None = None
    fail: BaseException | None = None
    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def write_pages(self, gfns: npt.NDArray[np.uint64], data: memoryview) -> None:
        if self.gate_gfn is not None and int(gfns[0]) == self.gate_gfn:
            self.entered.set()
            assert self.release.wait(WAIT)
            if self.fail is not None:
                raise self.fail
        self.memory.write_pages(gfns, data)

    def __getattr__(self, name: str) -> object:
        return getattr(self.memory, name)


@pytest.fixture
def session(emulated_vendor: Vendor, tmp_path: Path) -> Iterator[tuple[Session, _GatedMemory]]:
    src = launch_guest(new_sp(emulated_vendor, tmp_path / "a"))
    dst_hw = FakeHardware(GuestMemory(MEMORY))
    gated = _GatedMemory(dst_hw.memory)
    dst_hw.memory = gated  # type: ignore[assignment]
    s = Session(src=src, dst_sp=new_sp(emulated_vendor, tmp_path / "b"), dst_hw=dst_hw)
    s.setup()
    s.deliver()  # the immutable state
    s.bundles.clear()
    yield s, gated
    gated.release.set()


def _seal(s: Session, gfns: list[int], stream: int = 0) -> bytes:
    out = bytearray(bundle_capacity(wire.MAX_PAGES_PER_BUNDLE))
    n = s.src.sp.migration.export_memory(s.src.handle, stream, np.asarray(gfns, dtype=np.uint64), memoryview(out))
    return bytes(out[:n])


class _Call:
    """One import on its own thread, with its outcome."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self.result: object = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], object]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            self.error = exc
        finally:
            self.done.set()


def test_a_bundle_writes_while_another_imports_and_the_epoch_token_waits_for_both(
    session: tuple[Session, _GatedMemory],
) -> None:
    s, gated = session
    mig = s.dst_sp.migration
    for gfn in (0x200, 0x300):
        s.src.hw.guest_write(gfn << 12, bytes([gfn >> 8]) * PAGE)
    first, second = _seal(s, [0x200, 0x201]), _seal(s, [0x300], stream=1)
    token = s.src.sp.migration.export_epoch_token(s.src.handle, 0)
    gated.gate_gfn = 0x200
    blocked = _Call(lambda: mig.import_bundle(s.ref, first))
    assert gated.entered.wait(WAIT)
    # The lock is not held while the first bundle's pages are written: the second imports and writes meanwhile.
    mig.import_bundle(s.ref, second)
    assert s.dst_hw.memory.read(0x300 << 12, PAGE) == b"\x03" * PAGE
    closing = _Call(lambda: mig.import_bundle(s.ref, token))
    assert not closing.done.wait(NOT_YET), "the epoch token closed the epoch with a write still in flight"
    gated.release.set()
    assert blocked.done.wait(WAIT)
    assert closing.done.wait(WAIT)
    assert blocked.error is None
    assert closing.error is None
    assert s.dst_hw.memory.read(0x200 << 12, PAGE) == b"\x02" * PAGE


@pytest.mark.parametrize(
    ("failure", "raised"),
    [(DeviceError("the hardware refused the write"), IntegrityError), (OSError(5, "EIO"), OSError)],
    ids=["refused", "os-error"],
)
def test_a_failed_write_fails_the_import_and_the_token_after_it(
    session: tuple[Session, _GatedMemory], failure: BaseException, raised: type[BaseException]
) -> None:
    s, gated = session
    mig = s.dst_sp.migration
    s.src.hw.guest_write(0x200 << 12, b"z" * PAGE)
    bundle = _seal(s, [0x200])
    token = s.src.sp.migration.export_epoch_token(s.src.handle, 0)
    gated.gate_gfn, gated.fail = 0x200, failure
    failing = _Call(lambda: mig.import_bundle(s.ref, bundle))
    assert gated.entered.wait(WAIT)
    closing = _Call(lambda: mig.import_bundle(s.ref, token))
    assert not closing.done.wait(NOT_YET)
    gated.release.set()
    assert failing.done.wait(WAIT)
    assert closing.done.wait(WAIT)
    assert isinstance(failing.error, raised)
    assert isinstance(closing.error, IntegrityError), "a bundle counted but never written certified by its token"
    assert mig.import_state(s.ref) == "FAILED"


def test_discard_waits_for_the_write_in_flight(session: tuple[Session, _GatedMemory]) -> None:
    s, gated = session
    mig = s.dst_sp.migration
    s.src.hw.guest_write(0x200 << 12, b"q" * PAGE)
    bundle = _seal(s, [0x200])
    gated.gate_gfn = 0x200
    writing = _Call(lambda: mig.import_bundle(s.ref, bundle))
    assert gated.entered.wait(WAIT)
    discarding = _Call(lambda: mig.import_discard(s.ref))
    assert not discarding.done.wait(NOT_YET), "the import was discarded under a write to its hardware"
    gated.release.set()
    assert writing.done.wait(WAIT)
    assert discarding.done.wait(WAIT)
    assert discarding.error is None
