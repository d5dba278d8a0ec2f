"""attestation layer: HTTP plumbing shared by the attestation and key-release services.

* bounded body reading (``Content-Length`` checked first, then the stream counted: a chunked body cannot
  sneak past the limit), ``application/json`` enforcement, and one error shape for every refusal —
  ``{"error": {"kind", "message"}}`` (FastAPI's own 404/405/422 answers: ``cvmotion.ipc.openapi``);
* ``listen_socket``: bind before announcing (port 0 picks a free port), ``IPPROTO_TCP`` so asyncio sets
  ``TCP_NODELAY`` (without it Nagle + delayed ACK add ~40 ms per response);
* ``ServerThread``: uvicorn on a bound socket in a background thread (tests, in-process fabrics);
* ``serve``: uvicorn in this process, or ``workers`` forked processes sharing the socket (the kernel
  spreads connections; CPU-bound attestation scales with cores, the GIL does not let threads do that).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, Response

from cvmotion.attestation.service_error import ServiceError
from cvmotion.errors import UsageError
from cvmotion.ipc.http import ServerThread, listen_socket, parse_listen, uvicorn_config
from cvmotion.ipc.openapi import install_error_handlers

__all__ = [
    "BODY_REFUSALS",
    "EXAMPLE_JWT",
    "JWT_PATTERN",
    "ServerThread",
    "error_response",
    "install_error_handlers",
    "json_response",
    "listen_socket",
    "parse_listen",
    "read_json_body",
    "serve",
]

log = logging.getLogger("cvmotion.attestation.http")
JWT_PATTERN = r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$"  # compact JWS, as documented (RFC 7515 7.1)
# What read_json_body refuses besides its 400 bad_request (an unreadable Content-Length), for error_responses().
BODY_REFUSALS: dict[int, tuple[str, ...]] = {
    413: ("the body is larger than 64 KiB", "request_too_large"),
    415: ("the body is not application/json", "unsupported_media_type"),
}
EXAMPLE_JWT = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.eyJpc3MiOiJodHRwOi8vMTI3LjAuMC4xOjg3OTAifQ.c2lnbmF0dXJl"


def json_response(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(doc, separators=(",", ":")).encode()
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def error_response(exc: ServiceError) -> Response:
    return json_response(exc.to_json(), exc.status)


async def read_json_body(request: Request, limit: int) -> bytes:
    """The body of a JSON request, at most ``limit`` bytes.

    Raises:
        ServiceError: 415 ``unsupported_media_type``, 413 ``request_too_large``, 400 ``bad_request``.
    """
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype != "application/json":
        raise ServiceError(415, "unsupported_media_type", f"Content-Type must be application/json, not {ctype!r}")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ServiceError(400, "bad_request", f"Content-Length {declared!r} is not a number")
        if int(declared) > limit:
            raise ServiceError(413, "request_too_large", f"request body of {declared} bytes exceeds {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServiceError(413, "request_too_large", f"request body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _config(app: FastAPI) -> uvicorn.Config:
    return uvicorn_config(app)


def serve(app_factory: Callable[[], FastAPI], sock: socket.socket, *, workers: int = 1) -> int:
    """Serve until SIGINT/SIGTERM.  ``workers > 1`` forks that many processes, each building its own app.

    ``sock`` must have been made with ``listen_socket(..., reuse_port=True)`` when ``workers > 1``.

    Each worker builds its app *after* the fork (``app_factory``), so no thread, lock or connection pool
    crosses a fork; they share only the listening socket and the data directory.
    """
    if workers < 1:
        raise UsageError("--workers must be at least 1")
    if workers == 1:
        uvicorn.Server(_config(app_factory())).run(sockets=[sock])
        return 0
    # One SO_REUSEPORT socket per worker: with a single shared socket the first worker to wake accepts most
    # connections (measured: 2 workers gave 1.1x one worker); per-socket queues let the kernel hash them evenly.
    host, port = sock.getsockname()[:2]
    sockets = [sock] + [listen_socket(host, port, reuse_port=True)[0] for _ in range(workers - 1)]
    children: list[int] = []
    for mine in sockets:
        pid = os.fork()
        if pid == 0:  # worker: default signal handling, then serve until told to stop
            code = 0
            try:
                for other in sockets:
                    if other is not mine:
                        other.close()
                uvicorn.Server(_config(app_factory())).run(sockets=[mine])
            except BaseException:  # noqa: BLE001 - a worker must never return into the parent's code
                log.exception("attestation worker failed")
                code = 3
            finally:
                sys.stdout.flush()
                os._exit(code)
        children.append(pid)
    for extra in sockets[1:]:
        extra.close()

    def forward(signum: int, _frame: FrameType | None) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    for child in children:
        while True:
            try:
                _, code = os.waitpid(child, 0)
                break
            except InterruptedError:
                continue
        status = status or os.waitstatus_to_exitcode(code)
    return 0 if status in (0, -signal.SIGTERM, -signal.SIGINT) else 3
