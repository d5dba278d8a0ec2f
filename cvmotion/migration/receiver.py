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
from cvmotion.abi.wire import BundleHeader, BundleType
from cvmotion.errors import AbiError, CvmError, IntegrityError, MigrationError, ProtocolError
from cvmotion.migration.channel import FrameKind, FrameSocket
from cvmotion.migration.clients import PlatformClient, Ring, VmClient
from cvmotion.migration.options import MigrationOptions
from cvmotion.migration.stats import MigrationStats, MigrationStatus

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
        self._context_ready = threading.Event()
        self._streams: list[threading.Thread] = []
        self._stream_sockets: list[FrameSocket] = []
        self._rings: list[Ring] = []
        self._lock = threading.Lock()
        self.committed = threading.Event()
        self.failed = threading.Event()
        self.abort_token: bytes | None = None
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
                if not 0 <= index < self.expected_streams or len(self._streams) >= self.expected_streams:
                    raise ProtocolError(f"unexpected stream {index}")
                ring = Ring(f"in-{self.stats.id}-{index}", 2, self.options.pages_per_bundle)
                self.platform.attach_ring(ring)
                self._rings.append(ring)
                self._stream_sockets.append(sock)
                thread = threading.Thread(target=self._stream, args=(index, sock, ring), name=f"mig-in-{index}")
                self._streams.append(thread)
            thread.start()
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
            for thread in self._streams:
                thread.join(self.options.io_timeout)
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
                self.platform.call("ma_dest_begin", {"vm": self.stats.vm, "session_id": self.session_id.hex()})
                begun = True
            result, _, _ = self.platform.call(
                "ma_deliver", {"session_id": self.session_id.hex(), "role": "destination"}, payload
            )
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
        deadline = time.monotonic() + self.options.io_timeout
        with self._cond:
            while self._imported[epoch] < total and not self.failed.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return  # hand the token over anyway: the firmware will find the count wrong
                self._cond.wait(left)

    def _stream(self, index: int, sock: FrameSocket, ring: Ring) -> None:
        slot = 0
        try:
            while not self.failed.is_set():
                kind, length = sock.recv_head()
                if kind is FrameKind.END:
                    return
                if kind is not FrameKind.BUNDLE or length > ring.slot_size:
                    raise ProtocolError(f"stream {index}: unexpected {kind.name} frame of {length} bytes")
                view = ring.slot(slot)[:length]
                sock.recv_into(view)
                self._import(index, ring, slot, view)
                slot ^= 1
        except BaseException as exc:  # noqa: BLE001
            if not self.committed.is_set():
                self.fail(exc)
            else:
                # Committed but not running: the source is frozen, so the VM is stopped on both ends (safe,
                # never forked); say so loudly, the operator (or a daemon restart) activates it.
                log.exception("migration %s: committed but activation failed", self.stats.id)
                self.stats.error = f"committed, activation failed: {exc}"
                self.stats.outcome = "committed; destination VM not running"
                self.emit("MigrationActivationFailed", {"id": self.stats.id, "error": str(exc)})

    def _import(self, index: int, ring: Ring, slot: int, view: memoryview) -> None:
        header = BundleHeader.from_bytes(view)  # untrusted: only used to order work, never for security
        kind = header.type
        if kind is not BundleType.IMMUTABLE_STATE and not self._context_ready.wait(self.options.io_timeout):
            raise MigrationError("no guest context arrived")
        meta = bytes(view[wire.HEADER_SIZE : header.size - wire.MAC_SIZE])
        if kind is BundleType.EPOCH_TOKEN:
            self._wait_for(header.epoch, wire.parse_epoch_token_metadata(meta))
        elif kind is BundleType.START_TOKEN:
            self._wait_for(header.epoch, wire.parse_start_token_metadata(meta)[1])
        self.platform.import_bundle(self.stats.vm, ring, slot, len(view))
        self.stats.transferred += len(view)
        if kind is BundleType.IMMUTABLE_STATE:
            self._context_ready.set()
        if kind not in (BundleType.EPOCH_TOKEN, BundleType.START_TOKEN):
            with self._cond:
                self._imported[header.epoch] += 1
                self._cond.notify_all()
        if kind is BundleType.START_TOKEN:
            self._commit()

    def _commit(self) -> None:
        """The start token verified: the destination owns the VM now."""
        self.committed.set()
        result, _, _ = self.platform.call("import_activate", {"vm": self.stats.vm})
        self.handle = int(result["handle"])
        self.vm.call("resume")
        self.resumed_at = time.monotonic()
        self.stats.status = MigrationStatus.COMPLETED
        self.stats.outcome = "running on destination"
        if self.control is not None:
            with contextlib.suppress(OSError, CvmError):
                self.control.send_json(FrameKind.CONTROL, {"type": "committed", "handle": self.handle})
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
            self.abort_token = self.platform.call("import_abort", {"vm": s.vm})[1]
        except CvmError as abort_exc:
            s.error += f" (no abort token: {abort_exc})"
        if self.control is not None and self.abort_token is not None:
            message = {"type": "aborted", "reason": reason, "token": base64.b64encode(self.abort_token).decode()}
            with contextlib.suppress(OSError, CvmError):
                self.control.send_json(FrameKind.CONTROL, message)
        s.outcome = "import failed; source may resume with the abort token"
        self.emit("MigrationImportFailed", {"id": s.id, "error": reason, "kind": s.error_kind})
        for sock in self._stream_sockets:
            with contextlib.suppress(OSError):
                sock.sock.shutdown(2)

    def _finish(self) -> None:
        s = self.stats
        s.total_ms = s.elapsed_ms()
        if self.control is not None:
            with contextlib.suppress(OSError):
                self.control.close()
        for sock in self._stream_sockets:
            sock.close()
        for ring in self._rings:
            with contextlib.suppress(BufferError):
                ring.close()
        if not self.committed.is_set():
            with contextlib.suppress(CvmError):
                self.vm.call("stop")
            with contextlib.suppress(CvmError):
                self.platform.call("import_discard", {"vm": s.vm})
        self.done.set()
        if self.on_finished is not None:
            self.on_finished(self)

    def outcome(self) -> dict[str, Any]:
        """What a source daemon that lost the connection may ask: committed, or failed with the abort token."""
        if self.committed.is_set():
            return {"state": "committed"}
        if self.failed.is_set() and self.abort_token is not None:
            return {"state": "aborted", "token": base64.b64encode(self.abort_token).decode()}
        return {"state": "in-progress"}
