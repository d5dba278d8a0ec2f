"""``GET /v1/migrations/{id}?wait=S`` answers once the migration settles, or after S seconds: a controller learns
a move's end within milliseconds with one request instead of a request per poll interval."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cvmotion.host.api import create_app
from cvmotion.host.daemon import HostConfig, HostDaemon
from cvmotion.migration.stats import MigrationStats, MigrationStatus

MID = "3f2a9c1d0b7e"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[HostDaemon]:
    daemon = HostDaemon(HostConfig(name="h", data_dir=tmp_path, standby=False))
    daemon.migrations[MID] = MigrationStats(id=MID, vm="a", status=MigrationStatus.ACTIVE)
    try:
        yield daemon
    finally:
        daemon.stop()


async def _get(daemon: HostDaemon, query: str, settle_after: float | None = None) -> tuple[httpx.Response, float]:
    transport = httpx.ASGITransport(app=create_app(daemon))
    async with httpx.AsyncClient(transport=transport, base_url="http://host") as client:

        async def settle() -> None:
            assert settle_after is not None
            await asyncio.sleep(settle_after)
            daemon.migrations[MID].status = MigrationStatus.COMPLETED

        task = asyncio.create_task(settle()) if settle_after is not None else None
        t0 = time.monotonic()
        response = await client.get(f"/v1/migrations/{MID}{query}")
        elapsed = time.monotonic() - t0
        if task is not None:
            await task
        return response, elapsed


def test_without_wait_it_answers_at_once(daemon: HostDaemon) -> None:
    response, elapsed = asyncio.run(_get(daemon, ""))
    assert response.status_code == 200
    assert response.json()["status"] == "active"
    assert elapsed < 1.0


def test_it_answers_when_the_migration_settles(daemon: HostDaemon) -> None:
    response, elapsed = asyncio.run(_get(daemon, "?wait=20", settle_after=0.2))
    assert response.json()["status"] == "completed"
    assert 0.2 <= elapsed < 10.0  # well before the 20 s it could have waited


def test_it_answers_the_progress_when_the_wait_ends(daemon: HostDaemon) -> None:
    response, elapsed = asyncio.run(_get(daemon, "?wait=0.3"))
    assert response.status_code == 200
    assert response.json()["status"] == "active"
    assert elapsed >= 0.3


@pytest.mark.parametrize("wait", ["-1", "31", "soon", "nan"])
def test_a_wait_out_of_range_is_refused(daemon: HostDaemon, wait: str) -> None:
    response, _ = asyncio.run(_get(daemon, f"?wait={wait}"))
    assert response.status_code in (400, 422), response.text
    assert "wait" in response.text
