"""ipc.rpc lanes: a caller's own socket on which the peer serves its inline methods, one call at a time.

What a lane must keep of the connection's contract: the same answers and error classes, calls that are not the
peer's inline methods (or carry descriptors, or find the lane busy) on the connection, no hang when either end goes
away, a late answer never read as the next call's, and a peer that cannot be made to serve more than it offers.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cvmotion.errors import IntegrityError, UsageError
from cvmotion.ipc.rpc import MAX_LANES, Call, ChannelClosed, Endpoint, Reply, RpcError

_FRAME = struct.Struct("<IIII")
_MAGIC = 0x50525643


class _Server:
    """Handler that records which thread served each method and can hold a call until told."""

    def __init__(self) -> None:
        self.threads: dict[str, str] = {}
        self.release = threading.Event()
        self.entered = threading.Event()

    def __call__(self, call: Call) -> Reply:
        self.threads[call.method] = threading.current_thread().name
        if call.method == "echo":
            return Reply({"args": call.args}, call.blob)
        if call.method == "hold":
            self.entered.set()
            return Reply({"released": self.release.wait(10)})
        if call.method == "integrity":
            raise IntegrityError()
        if call.method == "usage":
            raise UsageError("bad size")
        if call.method == "ask":
            assert call.endpoint is not None
            return Reply({"got": call.endpoint.call("back", {"x": call.args["x"]}, timeout=5)[0]["back"]})
        if call.method == "read_fd":
            try:
                return Reply({"data": os.read(call.fds[0], 5).decode()})
            finally:
                os.close(call.fds[0])
        return Reply({"method": call.method})


INLINE = frozenset({"echo", "hold", "integrity", "usage", "ask", "read_fd"})


def _pair(server: Callable[[Call], Reply], inline: frozenset[str] = INLINE) -> tuple[Endpoint, Endpoint]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    client = Endpoint(a, lambda call: Reply({"back": call.args["x"] + 1}), name="client")
    return client, Endpoint(b, server, name="server", inline=inline)


@pytest.fixture
def lane() -> Iterator[tuple[Endpoint, Endpoint, _Server]]:
    server = _Server()
    client, end = _pair(server)
    assert client.open_lane(timeout=5)
    yield client, end, server
    server.release.set()
    client.close()
    end.close()


def test_inline_methods_go_on_the_lane_and_answer_as_over_the_connection(
    lane: tuple[Endpoint, Endpoint, _Server],
) -> None:
    client, _, server = lane
    blob = os.urandom(1 << 20)
    result, back, fds = client.call("echo", {"k": [1, 2]}, blob, timeout=5)
    assert (result, back, fds) == ({"args": {"k": [1, 2]}}, blob, [])
    assert server.threads["echo"] == "server-lane"
    client.call("elsewhere", timeout=5)  # not inline at the peer: the connection, a pool thread
    assert server.threads["elsewhere"].startswith("server-call")


def test_errors_on_the_lane_keep_their_class_and_the_lane(lane: tuple[Endpoint, Endpoint, _Server]) -> None:
    client, _, server = lane
    with pytest.raises(IntegrityError) as opaque:
        client.call("integrity", timeout=5)
    assert str(opaque.value) == str(IntegrityError())
    with pytest.raises(UsageError, match="bad size"):
        client.call("usage", timeout=5)
    assert client.call("echo", {"after": True}, timeout=5)[0] == {"args": {"after": True}}
    assert server.threads["echo"] == "server-lane"  # an error answer does not end the lane


def test_a_call_with_descriptors_takes_the_connection(lane: tuple[Endpoint, Endpoint, _Server]) -> None:
    client, _, server = lane
    r, w = os.pipe()
    try:
        os.write(w, b"hello")
        assert client.call("read_fd", fds=[r], timeout=5)[0] == {"data": "hello"}
    finally:
        os.close(r)
        os.close(w)
    assert server.threads["read_fd"] != "server-lane"


def test_a_second_caller_takes_the_connection_while_the_lane_is_busy(lane: tuple[Endpoint, Endpoint, _Server]) -> None:
    client, _, server = lane
    held: list[dict[str, Any]] = []
    t = threading.Thread(target=lambda: held.append(client.call("hold", timeout=15)[0]))
    t.start()
    try:
        assert server.entered.wait(5)
        assert server.threads["hold"] == "server-lane"
        # The lane's one thread is held: this call must not queue behind it.
        assert client.call("echo", {"n": 2}, timeout=5)[0] == {"args": {"n": 2}}
        assert server.threads["echo"] != "server-lane"
    finally:
        server.release.set()
        t.join(15)
    assert held == [{"released": True}]


def test_a_lane_handler_may_call_back_over_the_connection(lane: tuple[Endpoint, Endpoint, _Server]) -> None:
    client, _, server = lane
    for i in range(10):
        assert client.call("ask", {"x": i}, timeout=10)[0] == {"got": i + 1}
    assert server.threads["ask"] == "server-lane"


def test_a_timed_out_lane_call_ends_the_lane_and_its_late_answer_is_never_read(
    lane: tuple[Endpoint, Endpoint, _Server],
) -> None:
    client, _, server = lane
    with pytest.raises(RpcError, match="timed out"):
        client.call("hold", timeout=0.2)
    server.release.set()  # the answer to "hold" is written now, to a lane the caller gave up
    assert client.call("echo", {"n": 3}, timeout=5)[0] == {"args": {"n": 3}}
    assert server.threads["echo"] != "server-lane"


def test_a_peer_without_inline_methods_refuses_a_lane_and_calls_still_work() -> None:
    client, end = _pair(_Server(), inline=frozenset())
    try:
        assert not client.open_lane(timeout=5)
        assert client.call("echo", {"k": 1}, timeout=5)[0] == {"args": {"k": 1}}
    finally:
        client.close()
        end.close()


def test_a_peer_serves_at_most_max_lanes() -> None:
    """Each lane is a thread of the serving end: a peer asking again and again gets ``MAX_LANES`` of them."""
    client, end = _pair(_Server())
    kept: list[socket.socket] = []
    try:
        opened = 0
        for _ in range(MAX_LANES + 2):
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            kept.append(mine)  # open: a lane whose caller hung up would free its place
            try:
                if opened < MAX_LANES:
                    client.call("rpc.lane", fds=[theirs.fileno()], timeout=5)
                    opened += 1
                else:
                    with pytest.raises(UsageError, match="no more lanes"):
                        client.call("rpc.lane", fds=[theirs.fileno()], timeout=5)
            finally:
                theirs.close()
        assert opened == MAX_LANES
        assert sum(t.name == "server-lane" for t in threading.enumerate()) == MAX_LANES
    finally:
        for sock in kept:
            sock.close()
        client.close()
        end.close()


def test_closing_the_serving_end_fails_a_lane_call_instead_of_hanging(lane: tuple[Endpoint, Endpoint, _Server]) -> None:
    client, end, server = lane
    failed: list[BaseException] = []

    def held() -> None:
        try:
            client.call("hold", timeout=30)
        except BaseException as exc:  # noqa: BLE001 - what the caller sees is the point
            failed.append(exc)

    t = threading.Thread(target=held)
    t.start()
    assert server.entered.wait(5)
    end.close()
    server.release.set()
    t.join(10)
    assert not t.is_alive()
    # Either the answer got out before the lane closed, or the caller saw the end: never a hang.
    assert not failed or isinstance(failed[0], ChannelClosed)
    with pytest.raises(ChannelClosed):
        client.call("echo", timeout=5)


def test_closing_the_calling_end_ends_the_lane_thread(lane: tuple[Endpoint, Endpoint, _Server]) -> None:
    client, end, _ = lane
    client.call("echo", timeout=5)
    client.close()
    for _ in range(500):  # bounded
        if not any(t.name == "server-lane" for t in threading.enumerate()):
            break
        threading.Event().wait(0.01)
    assert not any(t.name == "server-lane" for t in threading.enumerate())
    assert end.wait_closed(5)


def _raw_call(sock: socket.socket, header: dict[str, Any]) -> dict[str, Any] | None:
    head = json.dumps(header).encode()
    sock.sendall(_FRAME.pack(_MAGIC, len(head), 0, 0) + head)
    frame = sock.recv(_FRAME.size, socket.MSG_WAITALL)
    if len(frame) < _FRAME.size:
        return None
    _, head_len, _, _ = _FRAME.unpack(frame)
    answer: dict[str, Any] = json.loads(sock.recv(head_len, socket.MSG_WAITALL))
    return answer


def test_a_lane_serves_only_inline_methods_whatever_the_peer_sends() -> None:
    """A hostile peer writing its own frames on the lane: a method that is not inline is refused there (it is not
    served at all), a second lane cannot be asked for on a lane, and anything but a call ends the lane."""
    server = _Server()
    client, end = _pair(server, inline=frozenset({"echo"}))
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        assert client.call("rpc.lane", fds=[theirs.fileno()], timeout=5)[0] == {"methods": ["echo"]}
        theirs.close()
        mine.settimeout(5)
        refused = _raw_call(mine, {"id": 1, "kind": "call", "method": "secret", "args": {}})
        assert refused is not None
        assert refused["kind"] == "err"
        assert "not served on a lane" in refused["error"]["message"]
        assert "secret" not in server.threads
        nested = _raw_call(mine, {"id": 2, "kind": "call", "method": "rpc.lane", "args": {}})
        assert nested is not None
        assert nested["kind"] == "err"
        served = _raw_call(mine, {"id": 3, "kind": "call", "method": "echo", "args": {"v": 1}})
        assert served == {"id": 3, "kind": "ok", "result": {"args": {"v": 1}}}
        assert _raw_call(mine, {"id": 4, "kind": "ok", "result": {}}) is None  # not a call: the lane ends
        assert client.call("echo", {"still": 1}, timeout=5)[0] == {"args": {"still": 1}}  # the connection stays
    finally:
        mine.close()
        client.close()
        end.close()


def test_a_lane_is_asked_for_with_one_unix_stream_socket() -> None:
    """Not a socket, not a stream, or two of them: refused, and the descriptors handed over are closed there."""
    client, end = _pair(_Server())
    r, w = os.pipe()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        for fds in ([r], [udp.fileno()], [pair[0].fileno(), pair[1].fileno()]):
            with pytest.raises(UsageError, match="lane"):
                client.call("rpc.lane", fds=fds, timeout=5)
        assert not any(t.name == "server-lane" for t in threading.enumerate())
        # The refused pipe end was closed on the serving side: with ours closed too, the writer sees no reader.
        os.close(r)
        r = -1
        with pytest.raises(BrokenPipeError):
            os.write(w, b"x")
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
        udp.close()
        for sock in pair:
            sock.close()
        client.close()
        end.close()
