"""ipc: refusing an oversized or malformed request body by its ``Content-Length``, as plain ASGI.

Every service bounds what a caller may make it read.  The check looks only at the request's headers, so it
needs no view of the response: a pure ASGI wrapper passes every other request and its response through
untouched.  Starlette's ``@app.middleware("http")`` (``BaseHTTPMiddleware``) would re-stream each response
through an in-memory channel, a second task and a copy per request, and under load a response's headers
could leave without its body (the client read ``IncompleteRead(0 bytes read, N more expected)``).
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["ContentLengthGate", "Judge"]

# The request's Content-Length header (None when absent) -> the refusal to send, or None to pass it on.
Judge = Callable[[str | None], Response | None]


class ContentLengthGate:
    """Answers ``judge``'s refusal before the application sees the request; otherwise calls it unchanged."""

    def __init__(self, app: ASGIApp, judge: Judge) -> None:
        self.app = app
        self.judge = judge

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self.judge(Headers(scope=scope).get("content-length"))
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)
