"""migration layer: the per-stream pipelines that keep the secure processor and the network busy at once.

Outgoing (source daemon), one per TCP stream::

    jobs ──► sealer thread ── export_memory(batch of bundles → ring slots) ──► sender thread ── sendmsg ──► TCP
                 ▲                                                                  │
                 └──────────────────────────── free slots ◄─────────────────────────┘

Incoming (destination daemon), one per TCP stream::

    TCP ──► reader thread ── recv_into(ring slot) ──► importer thread ── import_bundle(batch) ──► firmware
               ▲                                                              │
               └──────────────────────────── free slots ◄─────────────────────┘

The SP seals batch B while the daemon sends batch A; the destination receives bundle B while the SP opens
batch A.  A batch is several bundles in one round trip to the platform process, so the per-call cost (JSON,
Unix socket, thread hand-offs) is paid once per several MiB.  Everything here is untrusted transport: the
slots hold ciphertext, the header is read only to order work, the firmware authenticates everything.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cvmotion.abi.wire import BundleHeader, BundleType
from cvmotion.errors import MigrationError, ProtocolError
from cvmotion.migration.channel import FrameKind, FrameSocket
from cvmotion.platformd.client import Ring

__all__ = ["Arrival", "IncomingStream", "OutgoingStream"]

Job = npt.NDArray[np.uint64] | bytes  # GFNs to seal into one bundle, or a bundle the SP already sealed
SealBatch = Callable[[list[npt.NDArray[np.uint64]], list[int]], list[int]]
OnSent = Callable[[memoryview | bytes, int, bool], None]
_POLL = 0.2  # how often a blocked worker looks at the stop flag


class OutgoingStream:
    """One stream of an outgoing migration: a sealer and a sender thread around a ring of ``2 * batch`` slots."""

    def __init__(
        self, index: int, sock: FrameSocket, ring: Ring, *, seal: SealBatch, on_sent: OnSent, batch: int
    ) -> None:
        if ring.slots < 2 * batch:
            raise ValueError(f"a ring of {ring.slots} slots cannot double-buffer batches of {batch}")
        self.index = index
        self.sock = sock
        self.ring = ring
        self._seal = seal
        self._on_sent = on_sent
        self._batch = batch
        self._cond = threading.Condition()
        self._jobs: collections.deque[Job] = collections.deque()
        self._free: queue.Queue[int] = queue.Queue()
        for slot in range(ring.slots):
            self._free.put(slot)
        self._out: queue.Queue[tuple[int, int] | bytes | None] = queue.Queue()
        self._pending = 0
        self._closing = False
        self.error: BaseException | None = None
        self._sealer = threading.Thread(target=self._seal_loop, name=f"mig-seal-{index}", daemon=True)
        self._sender = threading.Thread(target=self._send_loop, name=f"mig-send-{index}", daemon=True)
        self._sealer.start()
        self._sender.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            self._pending += 1
            self._jobs.append(job)
            self._cond.notify_all()

    def drain(self, timeout: float) -> None:
        """Wait until everything submitted is on the wire (or raise the stream's error)."""
        with self._cond:
            if not self._cond.wait_for(lambda: not self._pending or self.error is not None, timeout):
                raise MigrationError(f"stream {self.index}: sending timed out")
        if self.error is not None:
            raise MigrationError(f"stream {self.index}: {self.error}") from self.error

    def send_now(self, bundles: list[bytes], timeout: float) -> None:
        """Send pre-sealed bundles from the caller's thread once everything submitted is on the wire: the
        switchover's tail without the hand-offs to the sealer and sender threads (each a wake-up in the blackout).
        """
        self.drain(timeout)
        with self._cond:
            if self._pending or self._jobs:
                raise MigrationError(f"stream {self.index}: bundles were submitted during the switchover")
            self._pending += 1  # a close() meanwhile waits for this like for any submitted job
        try:
            # One sendmsg for the whole tail: the destination reads it back to back (its importer waits for the
            # state bundles and the token together) instead of waking once per frame.
            for bundle, size in zip(bundles, self.sock.send_frames(FrameKind.BUNDLE, bundles), strict=True):
                self._on_sent(bundle, size, bundle[6] == BundleType.MEMORY)
        finally:
            self._done(1)

    def _done(self, count: int) -> None:
        with self._cond:
            self._pending -= count
            self._cond.notify_all()

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            if self.error is None:
                self.error = exc
            self._cond.notify_all()

    def _next_jobs(self) -> list[Job] | None:
        """The next pre-sealed bundle alone, or up to ``batch`` GFN arrays; None when closing."""
        with self._cond:
            while not self._jobs:
                if self._closing:
                    return None
                self._cond.wait(_POLL)
            first = self._jobs.popleft()
            if isinstance(first, bytes):
                return [first]
            jobs: list[Job] = [first]
            while len(jobs) < self._batch and self._jobs and not isinstance(self._jobs[0], bytes):
                jobs.append(self._jobs.popleft())
            return jobs

    def _take_slot(self) -> int | None:
        while self.error is None and not self._closing:
            try:
                return self._free.get(timeout=_POLL)
            except queue.Empty:
                continue
        return None

    def _seal_loop(self) -> None:
        while (jobs := self._next_jobs()) is not None:
            if isinstance(jobs[0], bytes):
                self._out.put(jobs[0])
                continue
            arrays = [j for j in jobs if not isinstance(j, bytes)]
            slots: list[int] = []
            for _ in arrays:
                slot = self._take_slot()
                if slot is None:
                    break
                slots.append(slot)
            if self.error is not None or len(slots) < len(arrays):
                for slot in slots:
                    self._free.put(slot)
                self._done(len(arrays))
                continue
            try:
                lengths = self._seal(arrays, slots)
            except BaseException as exc:  # noqa: BLE001 - handed to the coordinator, which aborts
                self._fail(exc)
                for slot in slots:
                    self._free.put(slot)
                self._done(len(arrays))
                continue
            for slot, length in zip(slots, lengths, strict=True):
                self._out.put((slot, length))

    def _send_loop(self) -> None:
        while (item := self._out.get()) is not None:
            slot = -1
            try:
                if self.error is None:
                    if isinstance(item, bytes):
                        self._on_sent(item, self.sock.send(FrameKind.BUNDLE, item), False)
                    else:
                        slot, length = item
                        bundle = self.ring.slot(slot)[:length]
                        self._on_sent(bundle, self.sock.send(FrameKind.BUNDLE, bundle), True)
                elif not isinstance(item, bytes):
                    slot = item[0]
            except BaseException as exc:  # noqa: BLE001
                self._fail(exc)
            finally:
                if slot >= 0:
                    self._free.put(slot)
                self._done(1)

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._sealer.join(5)
        self._out.put(None)
        self._sender.join(5)
        self.sock.close()


@dataclass(frozen=True, slots=True)
class Arrival:
    """A bundle received into a ring slot; ``header`` is untrusted (it only orders work)."""

    slot: int
    length: int
    header: BundleHeader


ImportBatch = Callable[[int, Ring, list[Arrival]], None]
_ALONE = (BundleType.IMMUTABLE_STATE,)
_TOKENS = (BundleType.EPOCH_TOKEN, BundleType.START_TOKEN)  # close a batch: nothing of their epoch follows them
_STATES = (BundleType.VCPU_STATE, BundleType.DEVICE_STATE, BundleType.MUTABLE_STATE)
# The source sends the state bundles and the start token back to back: an importer holding a state bundle waits
# this long for the rest, so the switchover's tail is one import call, not four round trips to the platform.
_SWITCHOVER_GATHER = 0.005  # seconds


class IncomingStream:
    """One stream of an incoming migration: a reader and an importer thread around a ring of slots.

    ``import_batch(index, ring, arrivals)`` is called in stream order with bundles of one epoch (the immutable
    state alone; a token only last); it returns once the firmware has them, and then their slots are reused.
    ``on_error`` gets the first failure of either thread; ``on_end`` an orderly END frame.
    """

    def __init__(
        self,
        index: int,
        sock: FrameSocket,
        ring: Ring,
        *,
        import_batch: ImportBatch,
        on_error: Callable[[BaseException], None],
        batch: int,
        gather: float = _SWITCHOVER_GATHER,
    ) -> None:
        self.index = index
        self.sock = sock
        self.ring = ring
        self._import_batch = import_batch
        self._on_error = on_error
        self._batch = batch
        self._gather = gather
        self._free: queue.Queue[int] = queue.Queue()
        for slot in range(ring.slots):
            self._free.put(slot)
        self._arrived: queue.Queue[Arrival | None] = queue.Queue()
        self._held: list[Arrival | None] = []  # one arrival read ahead that did not fit the last batch
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read_loop, name=f"mig-in-{index}", daemon=True)
        self._importer = threading.Thread(target=self._import_loop, name=f"mig-import-{index}", daemon=True)

    def start(self) -> None:
        self._reader.start()
        self._importer.start()

    def _read_loop(self) -> None:
        try:
            while not self._stop.is_set():
                slot = self._take_slot()
                if slot is None:
                    return
                kind, length = self.sock.recv_head()
                if kind is FrameKind.END:
                    return
                if kind is not FrameKind.BUNDLE or length > self.ring.slot_size:
                    raise ProtocolError(f"stream {self.index}: unexpected {kind.name} frame of {length} bytes")
                view = self.ring.slot(slot)[:length]
                self.sock.recv_into(view)
                header = BundleHeader.from_bytes(view)
                if header.stream != self.index:
                    # Each connection carries one stream: a bundle moved to another connection could otherwise
                    # reach the firmware in its stream's order or not, depending on timing.  Refuse it here.
                    raise ProtocolError(f"stream {self.index}: a bundle of stream {header.stream} on this connection")
                self._arrived.put(Arrival(slot, length, header))
        except BaseException as exc:  # noqa: BLE001
            if not self._stop.is_set():
                self._on_error(exc)
        finally:
            self._arrived.put(None)

    def _take_slot(self) -> int | None:
        while not self._stop.is_set():
            try:
                return self._free.get(timeout=_POLL)
            except queue.Empty:
                continue
        return None

    def _next_batch(self) -> list[Arrival] | None:
        """The next arrivals to hand over together: one epoch's bundles in order, a token or context alone."""
        first = self._held.pop() if self._held else self._arrived.get()
        if first is None:
            return None
        batch = [first]
        while batch[-1].header.type not in (*_ALONE, *_TOKENS) and len(batch) < self._batch + len(_STATES) + 1:
            try:
                if batch[-1].header.type in _STATES:
                    nxt = self._arrived.get(timeout=self._gather)
                else:
                    nxt = self._arrived.get_nowait()
            except queue.Empty:
                break
            if nxt is None or nxt.header.type in _ALONE or nxt.header.epoch != first.header.epoch:
                self._held.append(nxt)
                break
            if len(batch) >= self._batch and nxt.header.type not in (*_STATES, *_TOKENS):
                self._held.append(nxt)  # a full batch of pages; the switchover's tail may go beyond it
                break
            batch.append(nxt)
        return batch

    def _import_loop(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                if self._stop.is_set():
                    return
                try:
                    self._import_batch(self.index, self.ring, batch)
                finally:
                    for arrival in batch:
                        self._free.put(arrival.slot)
        except BaseException as exc:  # noqa: BLE001
            if not self._stop.is_set():
                self._on_error(exc)

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> None:
        self._reader.join(timeout)
        self._importer.join(timeout)
