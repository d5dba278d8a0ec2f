"""vmm layer: the cvm-io paravirtual request device, host side (wire layout: ``cvmotion.abi.cvmio``).

Host → guest requests travel through a queue: ``submit(request, timeout)`` enqueues and blocks until the
guest posts the response.  The guest pulls with WAIT_REQUEST, which blocks *inside the doorbell* for at
most ``timeout_ms``, and answers ``RETRY`` at once while the VMM is pausing, so a pause never waits for a
request to arrive.  Every byte the device writes into guest memory goes through ``GuestMemory.write``,
i.e. into the VMM dirty bitmap, because KVM's log does not see it.

::

    host thread                    device                        guest (vCPU thread, in OUT)
    submit(req) ──► queue ───────► WAIT_REQUEST: copy req, tag ──► handles it
         ▲                                                           │
         └──── response ◄──────── COMPLETE(tag): copy resp ◄─────────┘

The mailbox goes both ways: the host puts blobs the guest reads (GET_BLOB: the attestation token, the
Scheduled Events document) and the guest posts short messages to the host (POST_BLOB: its approvals of
scheduled events), which wait in a bounded outbox until the host takes them (``wait_posted``).  Only kinds
the host accepts (``POSTABLE``) can be posted; a full outbox answers RETRY.

Snapshot: the blob mailbox and the tag counter.  Requests in flight and posts not yet taken belong to this
process and are not part of it: ``close()`` fails their ``submit`` with ``DeviceError``.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

from cvmotion.abi import cvmio as abi
from cvmotion.errors import CvmError, DeviceError
from cvmotion.vmm.layout import PAGE_SIZE
from cvmotion.vmm.memory import GuestMemory

__all__ = ["CvmIo", "CvmIoState"]

_MAX_WAIT_MS = 1000  # cap on a guest-requested block, whatever timeout_ms says
MAX_POST = 4096  # bytes in one guest post (an IMDS StartRequests body for every event fits)
MAX_POSTS = 16  # posts waiting for the host; more answer RETRY (a guest cannot grow the VMM's memory)
POSTABLE = frozenset({abi.BlobKind.SCHEDULED_EVENTS})


@dataclass(frozen=True, slots=True)
class CvmIoState:
    next_tag: int = 1
    blobs: tuple[tuple[int, bytes], ...] = ()


@dataclass(slots=True)
class _Request:
    tag: int
    payload: bytes
    done: threading.Event = field(default_factory=threading.Event)
    response: bytes | None = None
    error: str | None = None


class CvmIo:
    """The device: registered on the port bus at ``abi.CVMIO_PORT``."""

    def __init__(self, memory: GuestMemory) -> None:
        self._memory = memory
        self._cond = threading.Condition()
        self._queue: collections.deque[_Request] = collections.deque()
        self._delivered: dict[int, _Request] = {}
        self._blobs: dict[int, bytes] = {}
        self._next_tag = 1
        self._interrupted = False
        self._closed = False
        self._posted: collections.deque[tuple[abi.BlobKind, bytes]] = collections.deque()

    # --- host API -------------------------------------------------------------------------------
    def submit(self, request: bytes, timeout: float) -> bytes:
        """Queue ``request`` for the guest and return its response.

        Raises:
            DeviceError: no response within ``timeout`` seconds, or the VM was closed.
        """
        with self._cond:
            if self._closed:
                raise DeviceError("cvm-io: the VM is closed")
            req = _Request(self._next_tag, bytes(request))
            self._next_tag = (self._next_tag % 0xFFFFFFFF) + 1
            self._queue.append(req)
            self._cond.notify_all()
        if not req.done.wait(timeout):
            with self._cond:
                if req in self._queue:
                    self._queue.remove(req)
                self._delivered.pop(req.tag, None)
            if not req.done.is_set():
                raise DeviceError(f"cvm-io: no response to request tag {req.tag} within {timeout:.3g} s")
        if req.response is None:
            raise DeviceError(f"cvm-io: request tag {req.tag} failed: {req.error}")
        return req.response

    def post(self, request: bytes) -> None:
        """Queue a request whose answer nobody waits for (it may never come: e.g. "shut down")."""
        with self._cond:
            if self._closed:
                raise DeviceError("cvm-io: the VM is closed")
            self._queue.append(_Request(self._next_tag, bytes(request)))
            self._next_tag = (self._next_tag % 0xFFFFFFFF) + 1
            self._cond.notify_all()

    def set_blob(self, kind: abi.BlobKind | int, data: bytes) -> None:
        """Put a blob (e.g. the attestation token) in the mailbox the guest reads with GET_BLOB."""
        with self._cond:
            self._blobs[int(kind)] = bytes(data)

    def clear_blob(self, kind: abi.BlobKind | int) -> None:
        with self._cond:
            self._blobs.pop(int(kind), None)

    def wait_posted(self, timeout: float) -> tuple[abi.BlobKind, bytes] | None:
        """The oldest message the guest posted (POST_BLOB), waiting at most ``timeout``; None if none came."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._posted and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
            return self._posted.popleft() if self._posted else None

    def interrupt_waits(self) -> None:
        """Make every WAIT_REQUEST answer RETRY now and until ``allow_waits`` (the VMM is pausing)."""
        with self._cond:
            self._interrupted = True
            self._cond.notify_all()

    def allow_waits(self) -> None:
        with self._cond:
            self._interrupted = False

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._interrupted = True
            pending = [*self._queue, *self._delivered.values()]
            self._queue.clear()
            self._delivered.clear()
            self._cond.notify_all()
        for req in pending:
            req.error = "the VM stopped before answering"
            req.done.set()

    def save(self) -> CvmIoState:
        with self._cond:
            return CvmIoState(self._next_tag, tuple(sorted(self._blobs.items())))

    def restore(self, state: CvmIoState) -> None:
        with self._cond:
            self._next_tag = state.next_tag
            self._blobs = dict(state.blobs)

    # --- guest side -----------------------------------------------------------------------------
    def pio_read(self, offset: int, size: int) -> int:
        if size != 4:
            return (1 << (8 * size)) - 1
        if offset == abi.Register.ID:
            return abi.CVMIO_ID
        if offset == abi.Register.VERSION:
            return abi.CVMIO_VERSION
        return 0xFFFFFFFF

    def pio_write(self, offset: int, size: int, value: int) -> None:
        if offset != abi.Register.DOORBELL or size != 4:
            return
        gpa = value
        if gpa % 8 or (gpa % PAGE_SIZE) + abi.DESCRIPTOR_SIZE > PAGE_SIZE:
            return  # the descriptor may not straddle a page; nothing sane to write back to
        try:
            raw = self._memory.read(gpa, abi.DESCRIPTOR_SIZE)
        except CvmError:
            return  # not RAM: like a DMA to nowhere, ignored
        desc = abi.CvmioDescriptor.from_buffer_copy(raw)
        status, length, tag = self._dispatch(desc)
        out = abi.CvmioDescriptor.from_buffer_copy(raw)
        out.status, out.len, out.tag = status, length, tag
        # Write back only status..timeout (bytes 2..), as the guest owns op; the page is VMM-dirtied.
        self._memory.write(gpa + 2, bytes(out)[2:])

    def _dispatch(self, d: abi.CvmioDescriptor) -> tuple[int, int, int]:
        if d.flags:
            return abi.Status.BAD_DESC, d.len, d.tag
        if d.op == abi.Op.WAIT_REQUEST:
            return self._wait_request(d)
        if d.op == abi.Op.COMPLETE:
            return self._complete(d)
        if d.op == abi.Op.GET_BLOB:
            return self._get_blob(d)
        if d.op == abi.Op.POST_BLOB:
            return self._post_blob(d)
        return abi.Status.BAD_DESC, d.len, d.tag

    def _buffer_ok(self, d: abi.CvmioDescriptor, length: int) -> bool:
        try:
            self._memory.layout.region_of(d.buf_gpa, max(length, 1))
        except CvmError:
            return False
        return True

    def _wait_request(self, d: abi.CvmioDescriptor) -> tuple[int, int, int]:
        deadline = time.monotonic() + min(d.timeout_ms, _MAX_WAIT_MS) / 1000
        with self._cond:
            while not self._queue and not self._interrupted:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._interrupted or not self._queue:
                return abi.Status.RETRY, 0, 0
            req = self._queue[0]
            if len(req.payload) > d.buf_len:
                return abi.Status.TOO_SMALL, len(req.payload), 0
            if not self._buffer_ok(d, len(req.payload)):
                return abi.Status.BAD_DESC, 0, 0
            self._queue.popleft()
            self._delivered[req.tag] = req
        self._memory.write(d.buf_gpa, req.payload)
        return abi.Status.OK, len(req.payload), req.tag

    def _complete(self, d: abi.CvmioDescriptor) -> tuple[int, int, int]:
        if d.len > d.buf_len or not self._buffer_ok(d, d.len):
            return abi.Status.BAD_DESC, d.len, d.tag
        with self._cond:
            req = self._delivered.pop(d.tag, None)
        if req is None:
            return abi.Status.BAD_TAG, d.len, d.tag
        req.response = self._memory.read(d.buf_gpa, d.len)
        req.done.set()
        return abi.Status.OK, d.len, d.tag

    def _get_blob(self, d: abi.CvmioDescriptor) -> tuple[int, int, int]:
        with self._cond:
            blob = self._blobs.get(d.tag)
        if blob is None:
            return abi.Status.NOT_FOUND, 0, d.tag
        if len(blob) > d.buf_len:
            return abi.Status.TOO_SMALL, len(blob), d.tag
        if not self._buffer_ok(d, len(blob)):
            return abi.Status.BAD_DESC, 0, d.tag
        self._memory.write(d.buf_gpa, blob)
        return abi.Status.OK, len(blob), d.tag

    def _post_blob(self, d: abi.CvmioDescriptor) -> tuple[int, int, int]:
        if d.tag not in POSTABLE:
            return abi.Status.NOT_FOUND, 0, d.tag
        if d.len > MAX_POST:
            return abi.Status.TOO_SMALL, MAX_POST, d.tag  # "len holds the size": here, the most it takes
        if d.len > d.buf_len or not self._buffer_ok(d, d.len):
            return abi.Status.BAD_DESC, 0, d.tag
        data = self._memory.read(d.buf_gpa, d.len)
        with self._cond:
            if self._closed or len(self._posted) >= MAX_POSTS:
                return abi.Status.RETRY, 0, d.tag
            self._posted.append((abi.BlobKind(d.tag), data))
            self._cond.notify_all()
        return abi.Status.OK, d.len, d.tag
