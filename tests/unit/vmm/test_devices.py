"""Devices without a CPU: the port bus, the UART/console, and cvm-io driven like a guest would."""

from __future__ import annotations

import struct
import threading
import time

import pytest

from cvmotion.abi import cvmio as abi
from cvmotion.errors import DeviceError
from cvmotion.vmm.devices.bus import IoBus
from cvmotion.vmm.devices.cvmio import CvmIo, CvmIoState
from cvmotion.vmm.devices.serial import Console, Serial
from cvmotion.vmm.layout import MIB
from cvmotion.vmm.memory import GuestMemory

DESC, BUF = 0x9000, 0xA000


class FakeGuest:
    """Writes descriptors into memory and rings the doorbell, as guests/lib/cvmio.c does."""

    def __init__(self, mem: GuestMemory, dev: CvmIo) -> None:
        self.mem, self.dev = mem, dev

    def call(
        self, op: abi.Op, *, length: int = 0, tag: int = 0, buf_len: int = 0x1000, timeout_ms: int = 50
    ) -> abi.CvmioDescriptor:
        desc = abi.CvmioDescriptor(
            op=op, status=abi.Status.PENDING, buf_gpa=BUF, buf_len=buf_len, len=length, tag=tag, timeout_ms=timeout_ms
        )
        self.mem.view(DESC, 32)[:] = bytes(desc)
        self.dev.pio_write(abi.Register.DOORBELL, 4, DESC)
        return abi.CvmioDescriptor.from_buffer_copy(self.mem.read(DESC, 32))


@pytest.fixture
def rig() -> tuple[GuestMemory, CvmIo, FakeGuest]:
    mem = GuestMemory(4 * MIB)
    dev = CvmIo(mem)
    yield mem, dev, FakeGuest(mem, dev)  # type: ignore[misc]
    dev.close()
    mem.close()


def test_bus_routes_ports_and_floats_unassigned_high() -> None:
    bus = IoBus()
    console = Console()
    bus.register(0x3F8, 8, Serial(console))
    assert bus.read(0x3FD, 1) == 0x60  # LSR: transmitter empty
    assert bus.read(0x1234, 4) == 0xFFFFFFFF
    for ch in b"hello\nwor":
        bus.write(0x3F8, 1, ch)
    assert console.lines() == ["hello"]
    assert console.wait_for("^hello$", 0.1)
    assert console.wait_for("world", 0.05) is None
    with pytest.raises(Exception, match="overlap"):
        bus.register(0x3FC, 2, Serial(console))


def test_serial_registers_survive_save_restore() -> None:
    serial = Serial(Console())
    serial.pio_write(3, 1, 0x80)
    serial.pio_write(0, 1, 0x01)
    serial.pio_write(3, 1, 0x03)
    serial.pio_write(7, 1, 0x5A)
    other = Serial(Console())
    other.restore(serial.save())
    assert (other.pio_read(3, 1), other.pio_read(7, 1)) == (0x03, 0x5A)


def test_request_round_trip_and_vmm_writes_are_dirty(rig: tuple[GuestMemory, CvmIo, FakeGuest]) -> None:
    mem, dev, guest = rig
    assert dev.pio_read(abi.Register.ID, 4) == abi.CVMIO_ID
    result: list[bytes] = []
    host = threading.Thread(target=lambda: result.append(dev.submit(b"ping", timeout=5)))
    host.start()
    got = guest.call(abi.Op.WAIT_REQUEST, timeout_ms=2000)
    assert (got.status, got.len) == (abi.Status.OK, 4)
    assert mem.read(BUF, 4) == b"ping"
    assert mem.vmm_dirty.take().as_set() == {DESC >> 12, BUF >> 12}
    mem.view(BUF, 4)[:] = b"pong"
    done = guest.call(abi.Op.COMPLETE, length=4, tag=got.tag)
    host.join(5)
    assert done.status == abi.Status.OK
    assert result == [b"pong"]
    assert guest.call(abi.Op.COMPLETE, length=4, tag=got.tag).status == abi.Status.BAD_TAG


def test_wait_retries_on_timeout_and_at_once_when_pausing(rig: tuple[GuestMemory, CvmIo, FakeGuest]) -> None:
    _, dev, guest = rig
    assert guest.call(abi.Op.WAIT_REQUEST, timeout_ms=20).status == abi.Status.RETRY
    threading.Timer(0.05, dev.interrupt_waits).start()
    t0 = time.monotonic()
    assert guest.call(abi.Op.WAIT_REQUEST, timeout_ms=1000).status == abi.Status.RETRY
    assert time.monotonic() - t0 < 0.5
    dev.allow_waits()


def test_blob_mailbox(rig: tuple[GuestMemory, CvmIo, FakeGuest]) -> None:
    mem, dev, guest = rig
    kind = abi.BlobKind.ATTESTATION_TOKEN
    assert guest.call(abi.Op.GET_BLOB, tag=kind).status == abi.Status.NOT_FOUND
    dev.set_blob(kind, b"t" * 100)
    small = guest.call(abi.Op.GET_BLOB, tag=kind, buf_len=10)
    assert (small.status, small.len) == (abi.Status.TOO_SMALL, 100)
    ok = guest.call(abi.Op.GET_BLOB, tag=kind)
    assert (ok.status, ok.len) == (abi.Status.OK, 100)
    assert mem.read(BUF, 100) == b"t" * 100
    assert dev.save() == CvmIoState(1, ((kind, b"t" * 100),))


def test_bad_descriptors_and_timeouts(rig: tuple[GuestMemory, CvmIo, FakeGuest]) -> None:
    mem, dev, guest = rig
    assert guest.call(abi.Op(3), tag=99, buf_len=0).status == abi.Status.NOT_FOUND
    desc = abi.CvmioDescriptor(op=9, status=abi.Status.PENDING)
    mem.view(DESC, 32)[:] = bytes(desc)
    dev.pio_write(0, 4, DESC)
    assert abi.CvmioDescriptor.from_buffer_copy(mem.read(DESC, 32)).status == abi.Status.BAD_DESC
    with pytest.raises(DeviceError, match="no response"):
        dev.submit(b"x", timeout=0.05)
    waiting: list[BaseException] = []

    def submit() -> None:
        try:
            dev.submit(b"y", timeout=5)
        except DeviceError as exc:
            waiting.append(exc)

    t = threading.Thread(target=submit)
    t.start()
    time.sleep(0.05)
    dev.close()
    t.join(5)
    assert waiting
    assert "stopped" in str(waiting[0])
    assert struct.calcsize("<HHIQIIII") == abi.DESCRIPTOR_SIZE


def test_guest_posts_reach_the_host_in_order_and_bounded(rig: tuple[GuestMemory, CvmIo, FakeGuest]) -> None:
    mem, dev, guest = rig
    kind = abi.BlobKind.SCHEDULED_EVENTS
    assert dev.wait_posted(0) is None
    mem.write(BUF, b'{"StartRequests":[{"EventId":"e1"}]}')
    ok = guest.call(abi.Op.POST_BLOB, tag=kind, length=36)
    assert (ok.status, ok.len) == (abi.Status.OK, 36)
    mem.write(BUF, b"second")
    assert guest.call(abi.Op.POST_BLOB, tag=kind, length=6).status == abi.Status.OK
    assert dev.wait_posted(1) == (kind, b'{"StartRequests":[{"EventId":"e1"}]}')
    assert dev.wait_posted(1) == (kind, b"second")
    # A kind the host takes nothing for, a post over the limit, a length past the buffer: refused.
    token = abi.BlobKind.ATTESTATION_TOKEN
    assert guest.call(abi.Op.POST_BLOB, tag=token, length=4).status == abi.Status.NOT_FOUND
    big = guest.call(abi.Op.POST_BLOB, tag=kind, length=4097, buf_len=8192)
    assert (big.status, big.len) == (abi.Status.TOO_SMALL, 4096)
    assert guest.call(abi.Op.POST_BLOB, tag=kind, length=100, buf_len=10).status == abi.Status.BAD_DESC
    # The outbox is bounded: a guest that posts faster than the host takes is told to retry.
    for _ in range(16):
        assert guest.call(abi.Op.POST_BLOB, tag=kind, length=1).status == abi.Status.OK
    assert guest.call(abi.Op.POST_BLOB, tag=kind, length=1).status == abi.Status.RETRY
    assert dev.wait_posted(0) is not None
    assert guest.call(abi.Op.POST_BLOB, tag=kind, length=1).status == abi.Status.OK
    assert dev.save() == CvmIoState(1, ())  # posts are not device state


def test_wait_posted_wakes_on_a_post_and_on_close(rig: tuple[GuestMemory, CvmIo, FakeGuest]) -> None:
    mem, dev, guest = rig
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(dev.wait_posted(30)))
    waiter.start()
    mem.write(BUF, b"x")
    assert guest.call(abi.Op.POST_BLOB, tag=abi.BlobKind.SCHEDULED_EVENTS, length=1).status == abi.Status.OK
    waiter.join(30)
    assert got == [(abi.BlobKind.SCHEDULED_EVENTS, b"x")]
    waiter = threading.Thread(target=lambda: got.append(dev.wait_posted(30)))
    waiter.start()
    dev.close()
    waiter.join(30)
    assert not waiter.is_alive()
    assert got[-1] is None
