"""ipc: HTTP serving plumbing shared by every service (KDS, attestation, key release, host API).

* ``parse_listen``: ``HOST:PORT`` (IPv6 as ``[::1]:PORT``) with a clear error;
* ``listen_socket``: bind before announcing (port 0 picks a free port, so the printed URL is connectable at
  once), ``IPPROTO_TCP`` so asyncio sets ``TCP_NODELAY`` (without it Nagle + delayed ACK add ~40 ms per
  response), optional ``SO_REUSEPORT`` for forked workers;
* ``uvicorn_config`` and ``ServerThread``: uvicorn on an already bound socket in a daemon thread (tests and
  in-process fabrics) — no start-up polling: the kernel queues connections until uvicorn accepts them.
"""

from __future__ import annotations

import socket
import threading
from types import TracebackType

import uvicorn
from fastapi import FastAPI

from cvmotion.errors import UsageError

__all__ = ["ServerThread", "listen_socket", "parse_listen", "uvicorn_config"]


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8790")
    return host, int(port)


def listen_socket(host: str, port: int, *, reuse_port: bool = False) -> tuple[socket.socket, str]:
    """A bound, listening TCP socket and its base URL."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:  # forked workers get one socket each on this port; the kernel balances connections
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if family == socket.AF_INET6 else bound_host
    return sock, f"http://{shown}:{bound_port}"


# An idle keep-alive connection is closed by the server only well after every client of ours gives it up
# (httpx's pool: 5 s). With equal timeouts the server's close can cross a client's next request on the wire
# and the client reads ECONNRESET on a request that was never processed (seen in CI under load).
KEEP_ALIVE_S = 75


def uvicorn_config(app: FastAPI) -> uvicorn.Config:
    return uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False, timeout_keep_alive=KEEP_ALIVE_S)


class ServerThread:
    """Run ``app`` on an already bound socket in a daemon thread."""

    def __init__(self, app: FastAPI, sock: socket.socket, url: str, *, name: str = "http-server") -> None:
        self.url = url
        self._sock = sock
        self._server = uvicorn.Server(uvicorn_config(app))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name=name, daemon=True)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._sock.close()
