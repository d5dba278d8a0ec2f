"""ipc: the keep-alive HTTP client the service clients (KDS, attestation, key release) build on, and the one
TLS context every HTTP client of a process shares.

Apart from ``cvmotion.ipc.http`` so that a client (the paravisor in every VM process) does not import the
server stack (uvicorn, FastAPI: ~0.3 s of start-up). httpx builds a verifying ``SSLContext`` (loading the CA
bundle: 25-55 ms here) for every ``Client`` and every top-level ``httpx.get/post`` unless it is given one;
``default_ssl_context`` makes it once per process.
"""

from __future__ import annotations

import functools
import ssl
from types import TracebackType
from typing import Self

import httpx

__all__ = ["HttpClient", "default_ssl_context"]


@functools.cache
def default_ssl_context() -> ssl.SSLContext:
    """httpx's default verifying context (system CA bundle via certifi), built once per process."""
    return httpx.create_ssl_context()


class HttpClient:
    """One keep-alive ``httpx.Client`` for a service at ``base_url``; a context manager that closes it."""

    def __init__(self, base_url: str, *, timeout: float = 10.0, transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = httpx.Client(
            base_url=self.base_url, timeout=timeout, transport=transport, verify=default_ssl_context()
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()
