"""ipc: the keep-alive HTTP client the service clients (KDS, attestation, key release) build on.

Apart from ``cvmotion.ipc.http`` so that a client (the paravisor in every VM process) does not import the
server stack (uvicorn, FastAPI: ~0.3 s of start-up).
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

import httpx

__all__ = ["HttpClient"]


class HttpClient:
    """One keep-alive ``httpx.Client`` for a service at ``base_url``; a context manager that closes it."""

    def __init__(self, base_url: str, *, timeout: float = 10.0, transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()
