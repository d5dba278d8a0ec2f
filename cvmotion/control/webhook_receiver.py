"""control layer: a webhook receiver — verifies each delivery's signature and recognises a repeated event.

What a consumer of the fleet's webhooks does, in a small HTTP server (loopback by default) that the
maintenance demo and the tests run: ``verify`` the Standard Webhooks signature over the exact body, refuse
(401) what does not verify, answer 2xx to what does, and keep each event once by ``webhook-id`` (the
controller delivers at least once, so a retry after a lost answer repeats an id).  ``respond`` decides the
status of each verified delivery (a test makes the receiver fail or stall with it).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cvmotion.control.webhook_signing import WebhookVerificationError, verify

__all__ = ["Received", "WebhookReceiver"]

MAX_BODY = 1 << 20


@dataclass(frozen=True, slots=True)
class Received:
    webhook_id: str
    event: dict[str, Any]
    headers: dict[str, str]
    body: bytes
    duplicate: bool  # this webhook-id had arrived before: the same event again (a retry)


@dataclass
class WebhookReceiver:
    secret: str
    host: str = "127.0.0.1"
    port: int = 0
    respond: Callable[[Received], int] = lambda _r: 204
    clock: Callable[[], float] = time.time
    received: list[Received] = field(default_factory=list)
    refused: int = 0
    _seen: set[str] = field(default_factory=set)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the receiver is not started")
        return f"http://{self.host}:{self._server.server_address[1]}/hook"

    def events(self) -> list[dict[str, Any]]:
        """Each event once (the first arrival of each webhook-id: a repeat is recognised), in arrival order."""
        with self._cond:
            return [r.event for r in self.received if not r.duplicate]

    def wait_for(self, check: Callable[[list[Received]], bool], timeout: float = 20.0) -> list[Received]:
        """Block until ``check(received)`` holds (bounded); what was received."""
        with self._cond:
            if not self._cond.wait_for(lambda: check(list(self.received)), timeout=timeout):
                raise TimeoutError(f"the receiver's condition did not hold within {timeout:.0f} s")
            return list(self.received)

    def _accept(self, headers: dict[str, str], body: bytes) -> int:
        try:
            webhook_id = verify(self.secret, headers, body, now=self.clock())
            event = json.loads(body)
        except (WebhookVerificationError, ValueError):
            with self._cond:
                self.refused += 1
                self._cond.notify_all()
            return 401
        with self._cond:
            record = Received(webhook_id, event, headers, body, duplicate=webhook_id in self._seen)
            self._seen.add(webhook_id)
            self.received.append(record)
            self._cond.notify_all()
        return self.respond(record)

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("content-length") or 0)
                if length > MAX_BODY:
                    self.send_response(413)
                    self.end_headers()
                    return
                body = self.rfile.read(length)
                status = receiver._accept({k.lower(): v for k, v in self.headers.items()}, body)
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="webhook-receiver", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
