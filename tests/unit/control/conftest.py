"""An in-process controller (SQLite in a temp dir, real workers, its API on loopback) and simulated hosts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from control_harness import Api

from cvmotion.control.api import create_app
from cvmotion.control.inventory import HostRegistration
from cvmotion.control.service import FleetController
from cvmotion.ipc.http import ServerThread, listen_socket
from cvmotion.testing.fakehost import FakeHost


@pytest.fixture
def fakehosts() -> Iterator[dict[str, FakeHost]]:
    hosts = {n: FakeHost(n, pool) for n, pool in (("h1", "pool-a"), ("h2", "pool-a"), ("h3", "pool-b"))}
    for h in hosts.values():
        h.__enter__()
    yield hosts
    for h in hosts.values():
        h.__exit__()


@pytest.fixture
def api(tmp_path: Path, fakehosts: dict[str, FakeHost]) -> Iterator[Api]:
    ctl = FleetController(tmp_path / "ctl", heartbeat_timeout=60.0, lease=2.0, workers=2)
    ctl.start()
    try:
        sock, url = listen_socket("127.0.0.1", 0)
        with ServerThread(create_app(ctl), sock, url), httpx.Client(base_url=url, timeout=30) as client:
            a = Api(client, ctl)
            for host in fakehosts.values():
                assert a.register(host).status_code == 200
            yield a
    finally:
        ctl.stop()


@pytest.fixture
def workerless(tmp_path: Path, fakehosts: dict[str, FakeHost]) -> Iterator[FleetController]:
    """A controller without workers (the test drives them itself), the fake hosts registered."""
    controller = FleetController(tmp_path / "ctl", workers=0)
    controller.start()
    try:
        for host in fakehosts.values():
            body = HostRegistration.model_validate(host.registration())
            controller.transaction(lambda s, b=body: controller.inventory.register(s, b))
        yield controller
    finally:
        controller.stop()
