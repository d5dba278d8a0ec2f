"""Controller e2e fixtures: the database (SQLite file, or a real PostgreSQL server when installed)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmotion.testing.fakehost import FakeHost
from cvmotion.testing.postgres import PostgresServer


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    """``None`` (the controller's default SQLite file) or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.database()


@pytest.fixture
def fakehosts() -> Iterator[dict[str, FakeHost]]:
    hosts = {n: FakeHost(n, pool) for n, pool in (("h1", "pool-a"), ("h2", "pool-a"))}
    for h in hosts.values():
        h.__enter__()
    yield hosts
    for h in hosts.values():
        h.__exit__()
