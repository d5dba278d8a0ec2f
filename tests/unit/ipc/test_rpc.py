"""ipc.rpc: calls both ways, blobs, file descriptors, error classes across the wire, closed channels."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cvmotion.errors import FirmwareError, FirmwareStatus, IntegrityError, PolicyViolation, UsageError
from cvmotion.ipc.rpc import Call, ChannelClosed, Endpoint, Reply, RpcError


def _server(call: Call) -> Reply:
    if call.method == "echo":
        return Reply({"args": call.args}, call.blob)
    if call.method == "read_fd":
        fd = call.fds[0]
        try:
            return Reply({"data": os.pread(fd, 5, 0).decode()})
        finally:
            os.close(fd)
    if call.method == "firmware":
        raise FirmwareError(FirmwareStatus.POLICY_FAILURE, "no")
    if call.method == "integrity":
        raise IntegrityError()
    if call.method == "policy":
        raise PolicyViolation(["a", "b"])
    if call.method == "usage":
        raise UsageError("bad size")
    if call.method == "bug":
        raise ZeroDivisionError("oops")
    raise UsageError(f"unknown method {call.method}")


@pytest.fixture
def pair() -> Iterator[tuple[Endpoint, Endpoint]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    client = Endpoint(a, lambda call: Reply({"back": call.args["x"] + 1}), name="client")
    server = Endpoint(b, _server, name="server")
    yield client, server
    client.close()
    server.close()


def test_echo_with_blob(pair: tuple[Endpoint, Endpoint]) -> None:
    client, _ = pair
    blob = os.urandom(3 << 20)
    result, back, fds = client.call("echo", {"k": [1, 2]}, blob)
    assert result == {"args": {"k": [1, 2]}}
    assert back == blob
    assert fds == []


def test_server_calls_back(pair: tuple[Endpoint, Endpoint]) -> None:
    _, server = pair
    assert server.call("anything", {"x": 41})[0] == {"back": 42}


def test_fd_passing(pair: tuple[Endpoint, Endpoint]) -> None:
    client, _ = pair
    fd = os.memfd_create("t")
    os.write(fd, b"hello")
    try:
        assert client.call("read_fd", fds=[fd])[0] == {"data": "hello"}
    finally:
        os.close(fd)


def test_errors_keep_their_class(pair: tuple[Endpoint, Endpoint]) -> None:
    client, _ = pair
    with pytest.raises(FirmwareError) as fw:
        client.call("firmware")
    assert fw.value.status is FirmwareStatus.POLICY_FAILURE
    with pytest.raises(IntegrityError, match="^integrity check failed$"):
        client.call("integrity")
    with pytest.raises(PolicyViolation) as pv:
        client.call("policy")
    assert pv.value.violations == ["a", "b"]
    with pytest.raises(UsageError, match="bad size"):
        client.call("usage")
    with pytest.raises(RpcError, match="ZeroDivisionError"):
        client.call("bug")


def test_concurrent_calls(pair: tuple[Endpoint, Endpoint]) -> None:
    client, _ = pair
    results: list[int] = []

    def worker(i: int) -> None:
        results.append(client.call("echo", {"i": i})[0]["args"]["i"])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(results) == list(range(16))


def test_peer_close_fails_pending_and_later_calls() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    started = threading.Event()

    def slow(call: Call) -> Reply:
        started.set()
        threading.Event().wait(5)
        return Reply()

    client = Endpoint(a, name="client")
    server = Endpoint(b, slow, name="server")
    errors: list[Exception] = []

    def call() -> None:
        try:
            client.call("slow", timeout=10)
        except Exception as exc:
            errors.append(exc)

    t = threading.Thread(target=call)
    t.start()
    assert started.wait(5)
    server.close()
    t.join(10)
    assert len(errors) == 1
    assert isinstance(errors[0], ChannelClosed)
    assert client.wait_closed(5)
    with pytest.raises(ChannelClosed):
        client.call("echo")


def test_garbage_drops_the_connection() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server = Endpoint(b, _server, name="server")
    a.sendall(b"GET / HTTP/1.1\r\n\r\n")
    assert server.wait_closed(5)
    a.close()


def test_after_runs_once_the_reply_is_sent() -> None:
    """``Reply.after`` is for work the caller must not wait for: the caller has its answer while it still runs."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    release, ran = threading.Event(), threading.Event()

    def after() -> None:
        release.wait(10)
        ran.set()

    client = Endpoint(a, name="client")
    server = Endpoint(b, lambda call: Reply({"ok": True}, after=after), name="server")
    try:
        assert client.call("anything", timeout=5)[0] == {"ok": True}  # times out if after() ran first
        assert not ran.is_set()
        release.set()
        assert ran.wait(5)
    finally:
        release.set()
        client.close()
        server.close()


def _inline_pair(handler: Callable[[Call], Reply], inline: frozenset[str]) -> tuple[Endpoint, Endpoint]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    client = Endpoint(a, lambda call: Reply({"back": call.args["x"] + 1}), name="client")
    return client, Endpoint(b, handler, name="server", inline=inline)


def _wait_for_a_waiting_reader(endpoint: Endpoint) -> None:
    for _ in range(500):  # bounded: both readers start at once
        if endpoint._waiting:  # noqa: SLF001 - the reader hand-off is what these tests check
            return
        threading.Event().wait(0.01)
    raise AssertionError("no reader waited for the turn")


def test_an_inline_method_is_served_by_the_reader_that_read_it() -> None:
    """No hand-off to a pool thread: the thread that read the call serves it (another reader took the socket)."""
    threads: dict[str, str] = {}

    def handler(call: Call) -> Reply:
        threads[call.method] = threading.current_thread().name
        return Reply()

    client, server = _inline_pair(handler, frozenset({"fast"}))
    try:
        _wait_for_a_waiting_reader(server)
        client.call("fast", timeout=5)
        _wait_for_a_waiting_reader(server)
        client.call("slow", timeout=5)
        assert "server-reader" in threads["fast"]
        assert "server-call" in threads["slow"]  # not named inline: the pool serves it
    finally:
        client.close()
        server.close()


def test_an_inline_handler_may_wait_for_its_own_call_back() -> None:
    """An inline call that calls back over the same connection and waits for the answer: the other reader reads
    that answer (with one reader serving, nobody would)."""

    def handler(call: Call) -> Reply:
        assert call.endpoint is not None
        return Reply({"got": call.endpoint.call("back", {"x": call.args["x"]}, timeout=5)[0]["back"]})

    client, server = _inline_pair(handler, frozenset({"ask"}))
    try:
        for i in range(20):
            _wait_for_a_waiting_reader(server)
            assert client.call("ask", {"x": i}, timeout=10)[0] == {"got": i + 1}
    finally:
        client.close()
        server.close()


def test_inline_calls_that_wait_on_each_other_still_complete() -> None:
    """The first inline call blocks until the second has run, and the second calls back over the connection: it is
    served by the pool (the reader serving the first is not waiting for the turn), so the one reader left goes on
    reading and its call back gets its answer."""
    second_ran = threading.Event()

    def handler(call: Call) -> Reply:
        if call.method == "first":
            return Reply({"waited": second_ran.wait(10)})
        assert call.endpoint is not None
        call.endpoint.call("back", {"x": 1}, timeout=5)
        second_ran.set()
        return Reply()

    client, server = _inline_pair(handler, frozenset({"first", "second"}))
    results: list[dict[str, Any]] = []
    try:
        _wait_for_a_waiting_reader(server)
        t = threading.Thread(target=lambda: results.append(client.call("first", timeout=15)[0]))
        t.start()
        client.call("second", timeout=15)
        t.join(15)
        assert results == [{"waited": True}]
    finally:
        second_ran.set()
        client.close()
        server.close()


def test_an_inline_endpoint_closes_cleanly_with_both_readers() -> None:
    client, server = _inline_pair(_server, frozenset({"echo"}))
    assert client.call("echo", {"k": 1}, timeout=5)[0] == {"args": {"k": 1}}
    client.close()
    assert server.wait_closed(5)
    for reader in server._readers:  # noqa: SLF001
        reader.join(5)
        assert not reader.is_alive()
