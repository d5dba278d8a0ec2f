"""migration layer: the destination side of a live migration (runs in the untrusted host daemon).

The daemon accepts the source's control connection and its N stream connections and hands them here.
The receiver relays the migration agents' session, then feeds every bundle, per stream and in arrival
order, to the destination firmware.  It reads only what the firmware authenticates anyway: the bundle
header (to wait for a whole epoch before handing over its epoch token) and the token metadata.

Any failure before the start token verifies ⇒ ``import_abort``: the import context becomes FAILED for
ever and its abort token goes back to the source (and stays available to ``outcome()`` for a source
daemon that lost the connection).  After the start token verifies the destination has committed: it
restores the vCPUs, resumes the VM and tells the source.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from cvmotion.abi import wire
from cvmotion.abi.wire import BundleType
from cvmotion.errors import AbiError, CvmError, IntegrityError, MigrationError, ProtocolError
from cvmotion.ipc import trace
from cvmotion.migration.channel import FrameKind, FrameSocket
from cvmotion.migration.options import MigrationOptions
from cvmotion.migration.pipeline import Arrival, IncomingStream
from cvmotion.migration.stats import MigrationOutcome, MigrationStats, MigrationStatus, Verdict
from cvmotion.platformd.client import Committed, PlatformClient, Ring
from cvmotion.vmd.client import VmClient

__all__ = ["Receiver"]

log = logging.getLogger("cvmotion.migration")

EventSink = Callable[[str, dict[str, Any]], object]


class Receiver:
    """Drives one incoming migration."""

    def __init__(
        self,
        *,
        stats: MigrationStats,
        platform: PlatformClient,
        vm: VmClient,
        session_id: bytes,
        streams: int,
        options: MigrationOptions,
        events: EventSink,
        on_finished: Callable[[Receiver], None] | None = None,
    ) -> None:
        self.stats = stats
        self.platform = platform
        self.vm = vm
        self.session_id = session_id
        self.expected_streams = streams
        self.options = options
        self.emit = events
        self.on_finished = on_finished
        self.control: FrameSocket | None = None
        self._control_ready = threading.Event()
        self._cond = threading.Condition()
        self._imported: dict[int, int] = defaultdict(int)
        self._epochs_closed = 0  # epoch tokens the firmware accepted: bundles of a later epoch wait for them
        self._context_ready = threading.Event()
        self._streams: list[IncomingStream] = []
        self._lock = threading.Lock()
        self.committed = threading.Event()
        self._commit_done = threading.Event()
        self._control_send_lock = threading.Lock()  # stream importers and the control loop all send
        self._phases: dict[str, float] = {}  # the switchover as this side saw it (ms), reported to the source
        self.failed = threading.Event()
        self.abort_token: bytes | None = None
        self.commit_receipt: bytes | None = None  # the destination firmware's proof of commit, for the source
        self.handle: int | None = None
        self.resumed_at = 0.0
        self.done = threading.Event()

    # -- connections -------------------------------------------------------------------------------

    def attach(self, sock: FrameSocket, hello: dict[str, Any]) -> None:
        role = hello.get("role")
        if role == "control":
            with self._lock:
                if self.control is not None:
                    raise ProtocolError("second control connection for one migration")
                self.control = sock
            self._control_ready.set()
        elif role == "stream":
            index = int(hello.get("index", -1))
            with self._lock:
                taken = {stream.index for stream in self._streams}
                if not 0 <= index < self.expected_streams or index in taken:
                    raise ProtocolError(f"unexpected stream {index}")
                o = self.options
                ring = Ring(f"in-{self.stats.id}-{index}", 2 * o.batch_bundles, o.pages_per_bundle)
                try:
                    self.platform.attach_ring(ring)
                except BaseException:
                    ring.close()
                    raise
                stream = IncomingStream(
                    index,
                    sock,
                    ring,
                    import_batch=self._import_batch,
                    on_error=self._stream_error,
                    batch=o.batch_bundles,
                )
                self._streams.append(stream)
            stream.start()
        else:
            raise ProtocolError(f"unknown connection role {role!r}")

    # -- control -----------------------------------------------------------------------------------

    def run(self) -> None:
        """The control loop: agent session, then wait for commit, cancel or loss. Never raises."""
        try:
            if not self._control_ready.wait(self.options.setup_timeout):
                raise MigrationError("the source never opened its control connection")
            assert self.control is not None
            self._agent_session()
            self.stats.status = MigrationStatus.ACTIVE
            self.control.sock.settimeout(1.0)
            while not self.committed.is_set() and not self.failed.is_set():
                try:
                    kind, message = self.control.recv_json()
                except TimeoutError:
                    continue
                if kind is FrameKind.CONTROL and message.get("type") == "cancel":
                    raise MigrationError(f"source cancelled: {message.get('reason', '')}")
                raise ProtocolError(f"unexpected {kind.name} frame on the control connection")
        except BaseException as exc:  # noqa: BLE001 - every failure ends in a verdict
            if not self.committed.is_set():
                self.fail(exc)
        finally:
            if self.committed.is_set():
                self._commit_done.wait(self.options.io_timeout)  # activation runs on the stream that committed
            self._finish()

    def _agent_session(self) -> None:
        assert self.control is not None
        deadline = time.monotonic() + self.options.setup_timeout
        begun = False
        while True:
            if time.monotonic() > deadline:
                raise MigrationError("migration agent session set-up timed out")
            kind, payload = self.control.recv()
            if kind is FrameKind.CONTROL:
                raise MigrationError("source cancelled during session set-up")
            if kind is not FrameKind.MA:
                raise ProtocolError(f"unexpected {kind.name} frame during session set-up")
            if not begun:
                self.platform.ma_dest_begin(self.stats.vm, self.session_id)
                begun = True
            result = self.platform.ma_deliver(self.session_id, "destination", payload)
            for msg in result.get("messages", []):
                self.control.send(FrameKind.MA, base64.b64decode(msg))
            if result.get("state") == "FAILED":
                violations = result.get("violations") or []
                raise MigrationError(f"migration agent refused: {result.get('error') or '; '.join(violations)}")
            if result.get("state") == "ESTABLISHED":
                self.stats.attestation = dict(result.get("summary", {}))
                self.emit("MigrationSetupDone", {"id": self.stats.id, "attestation": self.stats.attestation})
                return

    # -- streams -----------------------------------------------------------------------------------

    def _wait_for(self, epoch: int, total: int) -> None:
        """Hold a token of ``epoch`` until ``total`` bundles of that epoch went to the firmware (other streams)."""
        self._wait_until(lambda: self._imported[epoch] >= total)

    def _wait_epoch_open(self, epoch: int) -> None:
        """Hold a bundle of ``epoch`` until the tokens of every earlier epoch went through (they may travel on
        another stream): the firmware takes epochs strictly in order."""
        self._wait_until(lambda: self._epochs_closed >= epoch)

    def _wait_until(self, ready: Callable[[], bool]) -> None:
        """Until ``ready()`` (under the import condition), the migration failed, or ``io_timeout`` passed; on a
        timeout the bundle goes to the firmware anyway, which refuses a wrong count or an out-of-order epoch."""
        with self._cond:
            self._cond.wait_for(lambda: ready() or self.failed.is_set(), self.options.io_timeout)

    def _send_control(self, message: dict[str, Any]) -> None:
        """A message to the source (best effort: a lost control connection is handled by ``outcome()``)."""
        if self.control is None:
            return
        with self._control_send_lock, contextlib.suppress(OSError, CvmError):
            self.control.send_json(FrameKind.CONTROL, message)

    def _stream_error(self, exc: BaseException) -> None:
        # After the commit a stream ends when the source closes it (the normal end of a migration).
        if not self.committed.is_set():
            self.fail(exc)

    def _import_batch(self, index: int, ring: Ring, arrivals: list[Arrival]) -> None:
        """Hand bundles of one stream to the firmware, in order: one epoch's bundles, a token (if any) last."""
        header = arrivals[0].header  # untrusted: only used to order work, never for security
        last = arrivals[-1].header
        token = last.type in (BundleType.EPOCH_TOKEN, BundleType.START_TOKEN)
        kind = last.type if token else header.type
        carried = len(arrivals) - token  # every bundle but a token (the token's count is of the others)
        started = time.monotonic()
        if header.type is not BundleType.IMMUTABLE_STATE and not self._context_ready.wait(self.options.io_timeout):
            raise MigrationError("no guest context arrived")
        self._wait_epoch_open(header.epoch)
        if token:
            view = ring.slot(arrivals[-1].slot)[: arrivals[-1].length]
            meta = bytes(view[wire.HEADER_SIZE : last.size - wire.MAC_SIZE])
            if kind is BundleType.EPOCH_TOKEN:
                total = wire.parse_epoch_token_metadata(meta)
            else:
                total = wire.parse_start_token_metadata(meta)[1]
            # Every bundle of the epoch before the token: the other streams' and those riding in this batch.
            self._wait_for(header.epoch, total - carried)
        spans = [(ring.offset(a.slot), a.length) for a in arrivals]
        committed: Committed | None = None
        if kind is BundleType.START_TOKEN:
            # The batch that commits also activates and runs the guest, in the same command (one round trip less
            # to the platform, inside the blackout).
            committed = self.platform.import_and_activate(self.stats.vm, ring, spans)
        else:
            self.platform.import_bundles(self.stats.vm, ring, spans)
        self.stats.transferred += sum(a.length for a in arrivals)
        if kind is BundleType.IMMUTABLE_STATE:
            self._context_ready.set()
        if kind is BundleType.EPOCH_TOKEN:
            # The source times its rounds end to end by this (and does not run ahead of the import).
            self._send_control({"type": "epoch-imported", "epoch": header.epoch})
        with self._cond:
            self._imported[header.epoch] += carried
            if kind is BundleType.EPOCH_TOKEN:
                self._epochs_closed = max(self._epochs_closed, header.epoch + 1)
            self._cond.notify_all()
        if committed is not None:
            self._phases["start-token-imported"] = (time.monotonic() - started) * 1000
            try:
                self._commit(committed, started)
            except BaseException as exc:  # noqa: BLE001
                # Committed but not running: the source is frozen, so the VM is stopped on both ends (safe,
                # never forked); say so loudly, the operator (or a daemon restart) activates it.
                log.exception("migration %s: committed but activation failed", self.stats.id)
                self.stats.error = f"committed, activation failed: {exc}"
                self.stats.outcome = MigrationOutcome.COMMITTED_NOT_RUNNING
                self.emit("MigrationActivationFailed", {"id": self.stats.id, "error": str(exc)})
            finally:
                self._commit_done.set()

    def _commit(self, done: Committed, t0: float) -> None:
        """The start token verified (and, in the same command, the guest activated and run): the destination owns
        the VM now.  ``t0``: when the committing batch went to the platform."""
        self.committed.set()
        self.commit_receipt = done.receipt
        if done.error is not None or done.handle is None or done.resumed_at is None:
            raise MigrationError(done.error or "no handle in the answer")
        self.handle = done.handle
        self.resumed_at = time.monotonic()
        self._phases["activated"] = (self.resumed_at - t0) * 1000
        # When the guest ran again, as its VM process saw it (QEMU's RESUME event), not when this daemon heard.
        self.stats.resumed_at = done.resumed_at
        self._phases["resumed"] = (self.resumed_at - t0) * 1000
        trace.record("destination resumed", int(t0 * 1e9), int(self.resumed_at * 1e9))
        self.stats.status = MigrationStatus.COMPLETED
        self.stats.outcome = MigrationOutcome.RUNNING_ON_DESTINATION
        receipt = base64.b64encode(self.commit_receipt).decode()
        self._send_control({"type": "committed", "handle": self.handle, "phases": self._phases, "receipt": receipt})
        self.emit("MigrationCommitted", {"id": self.stats.id, "vm": self.stats.vm, "handle": self.handle})

    # -- failure -----------------------------------------------------------------------------------

    def fail(self, exc: BaseException) -> None:
        log.warning("migration %s: import failed: %s", self.stats.id, exc, exc_info=exc)
        with self._lock:
            if self.failed.is_set() or self.committed.is_set():
                return
            self.failed.set()
        with self._cond:
            self._cond.notify_all()
        opaque = isinstance(exc, (IntegrityError, AbiError))
        reason = "integrity check failed" if opaque else (str(exc) or type(exc).__name__)
        s = self.stats
        s.status = MigrationStatus.FAILED
        s.error = reason
        s.error_kind = "IntegrityError" if opaque else type(exc).__name__
        try:
            self.abort_token = self.platform.import_abort(s.vm)
        except CvmError as abort_exc:
            s.error += f" (no abort token: {abort_exc})"
        if self.abort_token is not None:
            token = base64.b64encode(self.abort_token).decode()
            self._send_control({"type": "aborted", "reason": reason, "token": token})
        s.outcome = MigrationOutcome.IMPORT_FAILED
        self.emit("MigrationImportFailed", {"id": s.id, "error": reason, "kind": s.error_kind})
        for stream in self._streams:
            stream.stop()
            with contextlib.suppress(OSError):
                stream.sock.sock.shutdown(2)

    def _finish(self) -> None:
        s = self.stats
        s.total_ms = s.elapsed_ms()
        if self.control is not None:
            with contextlib.suppress(OSError):
                self.control.close()
        for stream in self._streams:
            stream.stop()
            stream.sock.close()
        for stream in self._streams:
            stream.join(self.options.io_timeout)
            with contextlib.suppress(CvmError):
                self.platform.detach_ring(stream.ring)
            with contextlib.suppress(BufferError):
                stream.ring.close()
        if not self.committed.is_set():
            with contextlib.suppress(CvmError):
                self.vm.stop()
            with contextlib.suppress(CvmError):
                self.platform.import_discard(s.vm)
        self.done.set()
        if self.on_finished is not None:
            self.on_finished(self)

    def outcome(self) -> dict[str, Any]:
        """What a source daemon that lost the connection may ask: committed, or failed with the abort token."""
        if self.committed.is_set():
            receipt = self.commit_receipt
            if receipt is None:  # committed, activation failed: the firmware still proves the commit
                with contextlib.suppress(CvmError):
                    receipt = self.platform.import_commit_receipt(self.stats.vm)
            if receipt is None:
                return {"state": Verdict.IN_PROGRESS}
            return {"state": Verdict.COMMITTED, "token": base64.b64encode(receipt).decode()}
        if self.failed.is_set() and self.abort_token is not None:
            return {"state": Verdict.ABORTED, "token": base64.b64encode(self.abort_token).decode()}
        return {"state": Verdict.IN_PROGRESS}
