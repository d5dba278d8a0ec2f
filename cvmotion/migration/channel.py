"""migration layer: framing on the host-to-host TCP connections (all of it untrusted transport).

Each connection carries frames ``u8 kind | u32 length | payload``.  A migration uses one *control*
connection (JSON control messages and the migration agents' relayed messages) and N *stream* connections
(sealed bundles).  The payload of a BUNDLE frame is one bundle exactly as the source firmware sealed it;
this layer never looks inside beyond what routing needs, and everything it could alter is authenticated
by the destination firmware.
"""

from __future__ import annotations

import contextlib
import enum
import json
import socket
import struct
from collections.abc import Sequence
from typing import Any

from cvmotion.errors import ProtocolError

__all__ = ["MAX_FRAME", "FrameKind", "FrameSocket", "connect"]

_HEAD = struct.Struct("<BI")
MAX_FRAME = 8 << 20  # a memory bundle is at most ~2.1 MiB; anything larger is not ours
MAX_JSON = 1 << 20
_IOV_MAX = 1024  # Linux's UIO_MAXIOV: the most buffers one sendmsg takes


class FrameKind(enum.IntEnum):
    HELLO = 1  # JSON: which migration and which role this connection plays
    CONTROL = 2  # JSON control message
    MA = 3  # opaque migration-agent message (relayed, never interpreted here)
    BUNDLE = 4  # a sealed bundle
    END = 5  # orderly end of a stream


class FrameSocket:
    """A TCP connection speaking frames. Every blocking call is bounded by the socket timeout."""

    def __init__(self, sock: socket.socket, timeout: float = 30.0) -> None:
        self.sock = sock
        sock.settimeout(timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._head = bytearray(_HEAD.size)

    def send(self, kind: FrameKind, payload: bytes | bytearray | memoryview = b"") -> int:
        """One frame (head and payload in one ``sendmsg``, no copy); returns its size on the wire."""
        return self.send_frames(kind, [payload])[0]

    def send_frames(self, kind: FrameKind, payloads: Sequence[bytes | bytearray | memoryview]) -> list[int]:
        """Several frames of one kind in as few system calls as the kernel allows (one ``sendmsg`` of every head
        and payload, no copy): the peer reads them back to back instead of waking once per frame.  Returns each
        frame's size on the wire."""
        parts: list[memoryview] = []
        for payload in payloads:
            parts += [memoryview(_HEAD.pack(int(kind), len(payload))), memoryview(payload).cast("B")]
        while parts:
            sent = self.sock.sendmsg(parts[:_IOV_MAX])
            while parts and sent >= len(parts[0]):  # drop what went out whole; keep the rest of a partial one
                sent -= len(parts[0])
                parts.pop(0)
            if parts and sent:
                parts[0] = parts[0][sent:]
        return [_HEAD.size + len(payload) for payload in payloads]

    def send_json(self, kind: FrameKind, message: dict[str, Any]) -> None:
        self.send(kind, json.dumps(message, separators=(",", ":")).encode())

    def _recv_exact_into(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise ProtocolError("connection closed by the peer")
            got += n

    def recv_head(self) -> tuple[FrameKind, int]:
        self._recv_exact_into(memoryview(self._head))
        kind, length = _HEAD.unpack(self._head)
        try:
            frame_kind = FrameKind(kind)
        except ValueError:
            raise ProtocolError(f"unknown frame kind {kind}") from None
        if length > MAX_FRAME:
            raise ProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME}")
        return frame_kind, length

    def recv_into(self, view: memoryview) -> None:
        self._recv_exact_into(view)

    def recv(self) -> tuple[FrameKind, bytes]:
        kind, length = self.recv_head()
        buf = bytearray(length)
        self._recv_exact_into(memoryview(buf))
        return kind, bytes(buf)

    def recv_json(self, expect: FrameKind | None = None) -> tuple[FrameKind, dict[str, Any]]:
        kind, payload = self.recv()
        if expect is not None and kind is not expect:
            raise ProtocolError(f"expected a {expect.name} frame, got {kind.name}")
        if kind not in (FrameKind.HELLO, FrameKind.CONTROL):
            return kind, {"data": payload}
        if len(payload) > MAX_JSON:
            raise ProtocolError("control message too large")
        try:
            message = json.loads(payload)
        except ValueError as exc:
            raise ProtocolError(f"malformed control message: {exc}") from None
        if not isinstance(message, dict):
            raise ProtocolError("control message is not an object")
        return kind, message

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def connect(host: str, port: int, timeout: float = 30.0) -> FrameSocket:
    sock = socket.create_connection((host, port), timeout=timeout)
    return FrameSocket(sock, timeout)
