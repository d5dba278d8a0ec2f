"""testing: the adversarial hypervisor on the wire — a man in the middle on a host's migration listener.

The destination daemon runs with ``--migration-advertise 127.0.0.1:PROXYPORT``, so every source dials the
proxy; the proxy dials the real listener and relays.  It parses the channel framing
(``migration.channel``: ``u8 kind | u32 length | payload``; a connection opens with a HELLO JSON frame that
names its ticket, role ``control|stream`` and stream index) and hands every frame, in both directions, to a
*tamper* policy, which returns what to send instead (``tampering`` has the building blocks)::

    source ──► proxy: read frame ─► record bytes ─► log ─► tamper(frame) ─► [Frame | Raw | Cut ...] ──► dest
           ◄──                                                                                     ◄──

- ``Frame`` items go to the connection and direction they name: pass, drop (``[]``), duplicate, modify,
  delay/reorder (hold one, emit it later), move to another stream connection, inject (frames from the log,
  also from an earlier session: the log spans every session since ``reset``);
- ``Raw`` bytes go out as they are (a truncated frame); ``Cut`` closes every connection of a session;
- ``freeze()`` holds all traffic at frame boundaries until ``thaw()`` (fault tests stop a migration at a
  phase this way, then kill a daemon); a frozen relay still notices a cut.

Every byte read from either side is recorded (``carried()``) for the canary scan.  Sessions are numbered in
the order their first connection arrived.  Each relay direction has its own thread; tamper calls are
serialised, so policies keep plain state.  A connection's first frame must arrive within ``io_timeout``;
after that a relay waits as long as the peers do (they bound their own waits), until a close, ``cut()`` or
``close()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cvmotion.abi.wire import BundleHeader
from cvmotion.errors import AbiError, UsageError
from cvmotion.migration.channel import MAX_FRAME, FrameKind

__all__ = ["ConnKey", "Cut", "Direction", "Emit", "Frame", "MigrationProxy", "Raw", "Tamper"]

_HEAD = struct.Struct("<BI")


class Direction(enum.Enum):
    FORWARD = "source->destination"
    BACKWARD = "destination->source"


@dataclass(frozen=True, slots=True)
class ConnKey:
    """One relayed connection: the session (migration) it belongs to, its role and stream index (control: -1)."""

    session: int
    role: str
    index: int = -1


@dataclass(frozen=True, slots=True)
class Frame:
    """One channel frame as the proxy read it (``seq``: its number on this connection and direction)."""

    conn: ConnKey
    direction: Direction
    kind: int
    payload: bytes
    seq: int = 0

    def raw(self) -> bytes:
        return _HEAD.pack(self.kind, len(self.payload)) + self.payload

    def is_kind(self, kind: FrameKind) -> bool:
        return self.kind == int(kind)

    def bundle(self) -> BundleHeader | None:
        """The plaintext bundle header of a BUNDLE frame (None for other frames or an unparsable header)."""
        if not self.is_kind(FrameKind.BUNDLE):
            return None
        try:
            return BundleHeader.from_bytes(self.payload)
        except AbiError:
            return None

    def control(self) -> dict[str, Any] | None:
        """The JSON of a HELLO or CONTROL frame."""
        if not (self.is_kind(FrameKind.CONTROL) or self.is_kind(FrameKind.HELLO)):
            return None
        try:
            message = json.loads(self.payload)
        except ValueError:
            return None
        return message if isinstance(message, dict) else None

    def replace(self, **changes: Any) -> Frame:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, slots=True)
class Raw:
    """Bytes to write as they are (e.g. half a frame before a cut)."""

    conn: ConnKey
    direction: Direction
    data: bytes


@dataclass(frozen=True, slots=True)
class Cut:
    """Close every connection of a session, both sides (``None``: the session of the frame being handled)."""

    session: int | None = None


Emit = Frame | Raw | Cut
Tamper = Callable[[Frame, "MigrationProxy"], Sequence[Emit] | None]


class _Conn:
    def __init__(self, key: ConnKey, client: socket.socket, upstream: socket.socket) -> None:
        self.key = key
        self.client = client
        self.upstream = upstream
        self.locks = {Direction.FORWARD: threading.Lock(), Direction.BACKWARD: threading.Lock()}
        self.closed = threading.Event()
        self._ended: set[Direction] = set()
        self._lock = threading.Lock()

    def end(self, direction: Direction) -> None:
        """``direction`` reached EOF: pass the half-close on; close for good once both directions ended."""
        with contextlib.suppress(OSError):
            self.out(direction).shutdown(socket.SHUT_WR)
        with self._lock:
            self._ended.add(direction)
            both = len(self._ended) == 2
        if both:
            self.close()

    def out(self, direction: Direction) -> socket.socket:
        return self.upstream if direction is Direction.FORWARD else self.client

    def close(self) -> None:
        self.closed.set()
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def _passthrough(frame: Frame, proxy: MigrationProxy) -> None:
    return None


class MigrationProxy:
    """The man in the middle. ``start()``, point the destination's ``--migration-advertise`` at ``address``,
    set ``upstream`` to the destination's real migration port, and install a tamper with ``reset()``."""

    def __init__(self, *, host: str = "127.0.0.1", io_timeout: float = 60.0) -> None:
        self.host = host
        self.io_timeout = io_timeout
        self.upstream: tuple[str, int] | None = None
        self._tamper: Tamper = _passthrough
        self._tamper_lock = threading.Lock()
        self._lock = threading.Lock()
        self._seen = threading.Condition(self._lock)
        self._conns: dict[ConnKey, _Conn] = {}
        self._tickets: dict[str, int] = {}
        self._log: list[Frame] = []
        self._carried: list[bytes] = []
        self._thawed = threading.Event()
        self._thawed.set()
        self.frozen = threading.Event()
        self._closing = threading.Event()
        self._listener: socket.socket | None = None
        self.port = 0

    # -- set-up -------------------------------------------------------------------------------------

    def start(self) -> MigrationProxy:
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((self.host, 0))
        srv.listen(64)
        srv.settimeout(0.2)
        self._listener = srv
        self.port = int(srv.getsockname()[1])
        threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True).start()
        return self

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def reset(self, tamper: Tamper | None = None) -> None:
        """A new test: forget the log and the recording, thaw, install ``tamper`` (default: pass everything)."""
        with self._tamper_lock, self._lock:
            self._tamper = tamper or _passthrough
            self._log.clear()
            self._carried.clear()
            self._conns = {k: c for k, c in self._conns.items() if not c.closed.is_set()}
        self.frozen.clear()
        self._thawed.set()

    def close(self) -> None:
        self._closing.set()
        self._thawed.set()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            conns = list(self._conns.values())
        for conn in conns:
            conn.close()

    # -- what the adversary saw ---------------------------------------------------------------------

    def carried(self) -> list[bytes]:
        """Every byte read from either side since ``reset``, in arrival chunks (one per frame)."""
        with self._lock:
            return list(self._carried)

    def log(self, predicate: Callable[[Frame], bool] | None = None) -> list[Frame]:
        """Frames seen since ``reset`` (before tampering), oldest first."""
        with self._lock:
            return [f for f in self._log if predicate is None or predicate(f)]

    @property
    def session_count(self) -> int:
        with self._lock:
            return len(self._tickets)

    def current_session(self) -> int:
        with self._lock:
            if not self._tickets:
                raise UsageError("the proxy has seen no migration yet")
            return len(self._tickets) - 1

    def wait_for(self, predicate: Callable[[Frame], bool], timeout: float) -> Frame:
        """The first logged frame matching ``predicate``, waiting (bounded) for it to arrive."""
        deadline = time.monotonic() + timeout
        with self._seen:
            while True:
                for f in self._log:
                    if predicate(f):
                        return f
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no matching frame within {timeout:.0f} s")
                self._seen.wait(left)

    # -- control ------------------------------------------------------------------------------------

    def freeze(self) -> None:
        """Hold every frame not yet written, on every connection, until ``thaw`` (or a cut)."""
        self._thawed.clear()
        self.frozen.set()

    def thaw(self) -> None:
        self._thawed.set()

    def cut(self, session: int | None = None) -> None:
        """Close every connection of ``session`` (all sessions when None), both sides."""
        with self._lock:
            conns = [c for k, c in self._conns.items() if session is None or k.session == session]
        for conn in conns:
            conn.close()

    # -- relay --------------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), name="proxy-conn", daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(self.io_timeout)
        try:
            kind, payload = _read_frame(client, self._record)
            hello = json.loads(payload) if kind == FrameKind.HELLO else {}
            if self.upstream is None:
                raise UsageError("the proxy has no upstream")
            upstream = socket.create_connection(self.upstream, timeout=self.io_timeout)
        except (OSError, ValueError, UsageError, EOFError):
            client.close()
            return
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # From here a relay waits as long as the peers do: they bound their own waits and close, and a cut
            # or close() ends it (an idle control connection is not a reason to break a migration).
            sock.settimeout(None)
        with self._lock:
            session = self._tickets.setdefault(str(hello.get("ticket", "")), len(self._tickets))
            role = str(hello.get("role", "?"))
            key = ConnKey(session, role, int(hello.get("index", -1)) if role == "stream" else -1)
            conn = _Conn(key, client, upstream)
            old = self._conns.get(key)
            self._conns[key] = conn
        if old is not None:
            old.close()
        if self._handle(conn, Frame(key, Direction.FORWARD, kind, payload, 0)):
            back = threading.Thread(target=self._relay, args=(conn, Direction.BACKWARD), daemon=True)
            back.start()
            self._relay(conn, Direction.FORWARD, first_seq=1)
        else:
            conn.close()

    def _record(self, data: bytes) -> None:
        with self._lock:
            self._carried.append(data)

    def _relay(self, conn: _Conn, direction: Direction, first_seq: int = 0) -> None:
        src = conn.client if direction is Direction.FORWARD else conn.upstream
        seq = first_seq
        while not conn.closed.is_set():
            try:
                kind, payload = _read_frame(src, self._record)
            except EOFError:
                if self._wait_thawed(conn):  # a close is traffic too: a freeze holds it
                    conn.end(direction)  # an orderly close travels on as one
                return
            except (OSError, ValueError):
                break
            if not self._handle(conn, Frame(conn.key, direction, kind, payload, seq)):
                break
            seq += 1
        conn.close()

    def _handle(self, conn: _Conn, frame: Frame) -> bool:
        """Log, tamper, emit; False when this connection is finished."""
        with self._seen:
            self._log.append(frame)
            self._seen.notify_all()
        with self._tamper_lock:
            emits = self._tamper(frame, self)
        for item in [frame] if emits is None else emits:
            if isinstance(item, Cut):
                self.cut(frame.conn.session if item.session is None else item.session)
                continue
            target = self._target(item.conn)
            if target is None or not self._wait_thawed(target):
                continue
            data = item.raw() if isinstance(item, Frame) else item.data
            try:
                with target.locks[item.direction]:
                    target.out(item.direction).sendall(data)
            except OSError:
                target.close()
        return not conn.closed.is_set()

    def _target(self, key: ConnKey) -> _Conn | None:
        with self._lock:
            conn = self._conns.get(key)
        return None if conn is None or conn.closed.is_set() else conn

    def _wait_thawed(self, conn: _Conn) -> bool:
        while not self._thawed.wait(0.05):
            if conn.closed.is_set() or self._closing.is_set():
                return False
        return not conn.closed.is_set()


def _read_frame(sock: socket.socket, record: Callable[[bytes], None]) -> tuple[int, bytes]:
    head = _recv_exact(sock, _HEAD.size, record)
    kind, length = _HEAD.unpack(head)
    if length > MAX_FRAME:
        raise ValueError(f"frame of {length} bytes is not a cvmotion frame")
    return kind, _recv_exact(sock, length, record)


def _recv_exact(sock: socket.socket, n: int, record: Callable[[bytes], None]) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    try:
        while got < n:
            k = sock.recv_into(view[got:])
            if k == 0:
                raise EOFError("connection closed")
            got += k
    finally:
        if got:
            record(bytes(buf[:got]))
    return bytes(buf)
