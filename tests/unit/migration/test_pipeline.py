"""migration.pipeline and the receiver's ordering: stream order kept, batches bounded, slots recycled, errors
surfaced, and the destination firmware fed epochs strictly in order across streams."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
import pytest

from cvmotion.abi import wire
from cvmotion.abi.wire import BundleHeader, BundleType
from cvmotion.errors import MigrationError
from cvmotion.migration.channel import FrameKind, FrameSocket
from cvmotion.migration.options import MigrationOptions
from cvmotion.migration.pipeline import Arrival, IncomingStream, OutgoingStream
from cvmotion.migration.receiver import Receiver
from cvmotion.migration.stats import MigrationStats
from cvmotion.platformd.client import Ring

WAIT = 10.0


@pytest.fixture
def tcp_pair() -> Iterator[tuple[FrameSocket, FrameSocket]]:
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    server.close()
    a, b = FrameSocket(client, timeout=WAIT), FrameSocket(accepted, timeout=WAIT)
    yield a, b
    a.close()
    b.close()


def _bundle(
    kind: BundleType, epoch: int, mb: int, payload: bytes = b"", meta: bytes = b"", *, stream: int = 0
) -> bytes:
    size = wire.HEADER_SIZE + len(meta) + wire.MAC_SIZE
    head = BundleHeader(size=size, stream=stream, type=kind, mb_counter=mb, epoch=epoch, iv_counter=mb).to_bytes()
    return head + meta + bytes(wire.MAC_SIZE) + payload


# -- outgoing ---------------------------------------------------------------------------------------------


def test_send_frames_survives_partial_sends(tcp_pair: tuple[FrameSocket, FrameSocket]) -> None:
    """Frames sent in one sendmsg arrive whole and in order even when the kernel takes them in pieces (4 MiB
    through an 8 KiB send buffer: the calls are partial however fast the reader is)."""
    a, b = tcp_pair
    a.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    rng = np.random.default_rng(3)
    payloads = [rng.bytes(n) for n in (0, 1, 4095, 3 << 20, 17, 1 << 20)]
    got: list[tuple[FrameKind, bytes]] = []
    reader = threading.Thread(target=lambda: got.extend(b.recv() for _ in payloads))
    sizes: list[int] = []
    sender = threading.Thread(target=lambda: sizes.extend(a.send_frames(FrameKind.BUNDLE, payloads)))
    reader.start()
    sender.start()
    sender.join(WAIT)
    reader.join(WAIT)
    assert got == [(FrameKind.BUNDLE, p) for p in payloads]
    assert sizes == [5 + len(p) for p in payloads]


def test_outgoing_keeps_submission_order_and_bounds_batches(tcp_pair: tuple[FrameSocket, FrameSocket]) -> None:
    tx, rx = tcp_pair
    ring = Ring("test-out", 4, 4)
    batches: list[int] = []
    sent: list[tuple[bytes, bool]] = []

    def seal(arrays: list[npt.NDArray[np.uint64]], slots: list[int]) -> list[int]:
        batches.append(len(arrays))
        lengths = []
        for gfns, slot in zip(arrays, slots, strict=True):
            data = b"SEALED" + gfns.astype("<u8").tobytes()
            ring.slot(slot)[: len(data)] = data
            lengths.append(len(data))
        return lengths

    stream = OutgoingStream(0, tx, ring, seal=seal, on_sent=lambda b, n, m: sent.append((bytes(b), m)), batch=2)
    jobs: list[npt.NDArray[np.uint64] | bytes] = [np.array([i, i + 1], dtype=np.uint64) for i in range(0, 10, 2)]
    jobs.insert(2, b"PRESEALED-TOKEN")
    jobs.append(b"LAST")
    for job in jobs:
        stream.submit(job)
    stream.drain(WAIT)
    expected = [j if isinstance(j, bytes) else b"SEALED" + j.astype("<u8").tobytes() for j in jobs]
    received = [rx.recv() for _ in expected]
    assert [payload for _, payload in received] == expected
    assert all(kind is FrameKind.BUNDLE for kind, _ in received)
    assert [b for b, _ in sent] == expected
    assert [m for _, m in sent] == [not isinstance(j, bytes) for j in jobs]
    assert max(batches) <= 2
    assert sum(batches) == 5
    stream.close()
    ring.close()


def test_outgoing_seal_failure_surfaces_in_drain(tcp_pair: tuple[FrameSocket, FrameSocket]) -> None:
    tx, _ = tcp_pair
    ring = Ring("test-fail", 2, 4)

    def seal(arrays: list[npt.NDArray[np.uint64]], slots: list[int]) -> list[int]:
        raise MigrationError("the SP refused")

    stream = OutgoingStream(0, tx, ring, seal=seal, on_sent=lambda *a: None, batch=1)
    for i in range(5):
        stream.submit(np.array([i], dtype=np.uint64))
    with pytest.raises(MigrationError, match="the SP refused"):
        stream.drain(WAIT)
    started = time.monotonic()
    stream.close()
    assert time.monotonic() - started < 5
    ring.close()


def test_outgoing_ring_must_hold_two_batches(tcp_pair: tuple[FrameSocket, FrameSocket]) -> None:
    ring = Ring("test-small", 3, 4)
    with pytest.raises(ValueError, match="double-buffer"):
        OutgoingStream(0, tcp_pair[0], ring, seal=lambda a, s: [], on_sent=lambda *a: None, batch=2)
    ring.close()


# -- incoming ---------------------------------------------------------------------------------------------


def test_incoming_batches_one_epoch_a_token_last(tcp_pair: tuple[FrameSocket, FrameSocket]) -> None:
    tx, rx = tcp_pair
    ring = Ring("test-in", 2, 4)  # fewer slots than bundles: slots must be recycled
    batches: list[list[tuple[BundleType, int, bytes]]] = []
    errors: list[BaseException] = []
    done = threading.Event()
    plan = [
        _bundle(BundleType.IMMUTABLE_STATE, 0, 0, b"ctx"),
        *(_bundle(BundleType.MEMORY, 0, i, bytes([i]) * 100) for i in range(1, 4)),
        _bundle(BundleType.EPOCH_TOKEN, 0, 4, meta=wire.pack_epoch_token_metadata(4)),
        *(_bundle(BundleType.MEMORY, 1, i, bytes([i]) * 50) for i in range(5, 8)),
        _bundle(BundleType.START_TOKEN, 1, 8, meta=wire.pack_start_token_metadata(bytes(16), 3)),
    ]

    def import_batch(index: int, r: Ring, arrivals: list[Arrival]) -> None:
        time.sleep(0.01)  # a slow SP: arrivals queue up behind it
        batches.append([(a.header.type, a.header.epoch, bytes(r.slot(a.slot)[: a.length])) for a in arrivals])
        if sum(len(b) for b in batches) == len(plan):
            done.set()

    stream = IncomingStream(0, rx, ring, import_batch=import_batch, on_error=errors.append, batch=3)
    stream.start()
    for bundle in plan:
        tx.send(FrameKind.BUNDLE, bundle)
    assert done.wait(WAIT), errors
    assert [data for batch in batches for _, _, data in batch] == plan
    tokens = (BundleType.EPOCH_TOKEN, BundleType.START_TOKEN)
    for batch in batches:
        kinds = [k for k, _, _ in batch]
        assert kinds.count(BundleType.MEMORY) <= 3
        assert len({epoch for _, epoch, _ in batch}) == 1
        if BundleType.IMMUTABLE_STATE in kinds:
            assert len(batch) == 1
        assert all(k not in tokens for k in kinds[:-1])  # a token only closes a batch
    tx.send(FrameKind.END)
    stream.join(WAIT)
    assert not errors
    ring.close()


def test_the_switchover_tail_is_one_batch(tcp_pair: tuple[FrameSocket, FrameSocket]) -> None:
    """The state bundles and the start token, sent back to back, reach the firmware in one import call (each call
    is a round trip to the platform process inside the blackout), even if the importer wakes at the first."""
    tx, rx = tcp_pair
    ring = Ring("test-tail", 8, 4)
    batches: list[list[BundleType]] = []
    errors: list[BaseException] = []
    done = threading.Event()
    tail = [
        _bundle(BundleType.VCPU_STATE, 2, 0, b"vcpu"),
        _bundle(BundleType.DEVICE_STATE, 2, 1, b"device"),
        _bundle(BundleType.MUTABLE_STATE, 2, 2, b"mutable"),
        _bundle(BundleType.START_TOKEN, 2, 3, meta=wire.pack_start_token_metadata(bytes(16), 3)),
    ]

    def import_batch(index: int, r: Ring, arrivals: list[Arrival]) -> None:
        batches.append([a.header.type for a in arrivals])
        if sum(len(b) for b in batches) == len(tail):
            done.set()

    stream = IncomingStream(0, rx, ring, import_batch=import_batch, on_error=errors.append, batch=4)
    stream.start()
    for bundle in tail:
        tx.send(FrameKind.BUNDLE, bundle)
        time.sleep(0.0005)
    assert done.wait(WAIT), errors
    assert batches == [
        [BundleType.VCPU_STATE, BundleType.DEVICE_STATE, BundleType.MUTABLE_STATE, BundleType.START_TOKEN]
    ]
    tx.send(FrameKind.END)
    stream.join(WAIT)
    assert not errors
    ring.close()


def test_incoming_refuses_a_bundle_of_another_stream(tcp_pair: tuple[FrameSocket, FrameSocket]) -> None:
    tx, rx = tcp_pair
    ring = Ring("test-moved", 2, 1)
    errors: list[BaseException] = []
    imported: list[Arrival] = []
    stream = IncomingStream(
        1, rx, ring, import_batch=lambda i, r, a: imported.extend(a), on_error=errors.append, batch=1
    )
    stream.start()
    tx.send(FrameKind.BUNDLE, _bundle(BundleType.MEMORY, 0, 0, b"x", stream=0))  # stream 0's bundle, moved
    stream.join(WAIT)
    assert not imported
    assert errors
    assert "a bundle of stream 0 on this connection" in str(errors[0])
    errors.clear()  # the traceback holds the reader's view of the ring
    ring.close()


def test_incoming_refuses_an_oversized_frame(tcp_pair: tuple[FrameSocket, FrameSocket]) -> None:
    tx, rx = tcp_pair
    ring = Ring("test-big", 2, 1)
    errors: list[BaseException] = []
    stream = IncomingStream(0, rx, ring, import_batch=lambda *a: None, on_error=errors.append, batch=1)
    stream.start()
    tx.send(FrameKind.BUNDLE, bytes(ring.slot_size + 1))
    stream.join(WAIT)
    assert errors
    assert "unexpected BUNDLE frame" in str(errors[0])
    ring.close()


# -- receiver ordering across streams ---------------------------------------------------------------------


class _FakePlatform:
    """Records what the receiver hands the firmware, in order."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.imported: list[tuple[int, BundleType, int]] = []

    def attach_ring(self, ring: Ring) -> None:
        return None

    def detach_ring(self, ring: Ring) -> None:
        return None

    def import_bundles(self, vm: str, ring: Ring, bundles: list[tuple[int, int]]) -> list[str]:
        out = []
        for offset, length in bundles:
            header = BundleHeader.from_bytes(ring.view[offset : offset + length])
            with self.lock:
                self.imported.append((int(ring.name.rsplit("-", 1)[1]), header.type, header.epoch))
            out.append(header.type.name)
        return out

    def import_activate(self, vm: str) -> tuple[int, bytes]:
        return 7, b""

    def import_abort(self, vm: str) -> bytes:
        return b""

    def import_discard(self, vm: str) -> None:
        return None

    def import_commit_receipt(self, vm: str) -> bytes:
        return b""


class _FakeVm:
    def resume(self) -> None:
        return None

    def stop(self) -> None:
        return None


def test_receiver_feeds_epochs_in_order_across_streams() -> None:
    platform = _FakePlatform()
    receiver = Receiver(
        stats=MigrationStats(id="t", vm="vm"),
        platform=platform,  # type: ignore[arg-type]
        vm=_FakeVm(),  # type: ignore[arg-type]
        session_id=bytes(16),
        streams=2,
        options=MigrationOptions(io_timeout=WAIT),
        events=lambda kind, data: None,
    )
    server = socket.create_server(("127.0.0.1", 0))
    senders = []
    for index in range(2):
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        receiver.attach(FrameSocket(accepted, timeout=WAIT), {"role": "stream", "index": index})
        senders.append(FrameSocket(client, timeout=WAIT))
    server.close()
    # Stream 1 races ahead with a bundle of epoch 1 before stream 0 has even sent the guest context.
    senders[1].send(FrameKind.BUNDLE, _bundle(BundleType.MEMORY, 0, 0, b"a", stream=1))
    senders[1].send(FrameKind.BUNDLE, _bundle(BundleType.MEMORY, 1, 1, b"b", stream=1))
    time.sleep(0.05)
    senders[0].send(FrameKind.BUNDLE, _bundle(BundleType.IMMUTABLE_STATE, 0, 0, b"ctx"))
    senders[0].send(FrameKind.BUNDLE, _bundle(BundleType.MEMORY, 0, 1, b"c"))
    senders[0].send(FrameKind.BUNDLE, _bundle(BundleType.EPOCH_TOKEN, 0, 2, meta=wire.pack_epoch_token_metadata(3)))
    deadline = time.monotonic() + WAIT
    while len(platform.imported) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    order = platform.imported
    assert order[0] == (0, BundleType.IMMUTABLE_STATE, 0)
    token = order.index((0, BundleType.EPOCH_TOKEN, 0))
    assert sorted(order[1:token]) == [(0, BundleType.MEMORY, 0), (1, BundleType.MEMORY, 0)]
    assert order[token + 1 :] == [(1, BundleType.MEMORY, 1)]
    receiver.fail(MigrationError("test over"))
    receiver._finish()
    for s in senders:
        s.close()
