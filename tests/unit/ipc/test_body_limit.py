"""The Content-Length gate: refusals before the application reads anything, every other exchange untouched."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from cvmotion.host.api import create_app
from cvmotion.host.api_schema import MAX_BODY
from cvmotion.host.daemon import HostConfig, HostDaemon
from cvmotion.ipc.body_limit import ContentLengthGate

LIMIT = 64


def _app(seen: list[bytes]) -> FastAPI:
    app = FastAPI()

    def judge(length: str | None) -> JSONResponse | None:
        if length is not None and (not length.isdigit() or int(length) > LIMIT):
            return JSONResponse({"error": f"refused {length!r}"}, status_code=413)
        return None

    app.add_middleware(ContentLengthGate, judge=judge)

    @app.post("/echo")
    async def echo(request: Request) -> StreamingResponse:
        body = await request.body()
        seen.append(body)

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(200):  # many body messages: a re-streaming middleware would copy each
                yield body + b"%d\n" % i

        return StreamingResponse(chunks(), media_type="text/plain")

    return app


def _post(app: FastAPI, content: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post("/echo", content=content, headers=headers)

    return asyncio.run(go())


def test_a_body_within_the_limit_and_its_response_pass_unchanged() -> None:
    seen: list[bytes] = []
    response = _post(_app(seen), b"x" * LIMIT)
    assert response.status_code == 200
    assert seen == [b"x" * LIMIT]
    assert response.content == b"".join(b"x" * LIMIT + b"%d\n" % i for i in range(200))


def test_an_oversized_or_malformed_length_is_refused_before_the_app_reads_it() -> None:
    seen: list[bytes] = []
    over = _post(_app(seen), b"x" * (LIMIT + 1))
    assert (over.status_code, over.json()) == (413, {"error": f"refused '{LIMIT + 1}'"})
    bad = _post(_app(seen), b"", headers={"content-length": "-1"})
    assert bad.status_code == 413
    assert seen == []


def test_the_host_api_refuses_a_body_over_its_limit(tmp_path: Path) -> None:
    daemon = HostDaemon(HostConfig(name="h", data_dir=tmp_path, standby=False))
    try:

        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=create_app(daemon))
            async with httpx.AsyncClient(transport=transport, base_url="http://host") as client:
                return await client.post("/v1/vms", content=b"{" + b" " * MAX_BODY + b"}")

        response = asyncio.run(go())
    finally:
        daemon.stop()
    assert response.status_code == 413
    assert response.json()["error"]["message"] == f"request body over {MAX_BODY} bytes"
    assert daemon.vms == {}
