"""Portal fixtures: an in-process controller with simulated hosts (HTTP-level tests), and headless Chromium."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from cvmotion.control.api import create_app
from cvmotion.control.auth import Role, issue_token
from cvmotion.control.service import OWNER_TOKEN_FILE, FleetController
from cvmotion.ipc.http import ServerThread, listen_socket
from cvmotion.testing.fakehost import FakeHost


@dataclass
class Site:
    url: str
    ctl: FleetController

    @property
    def owner(self) -> str:
        return (self.ctl.data_dir / OWNER_TOKEN_FILE).read_text().strip()

    def token(self, role: Role, sub: str = "*") -> str:
        return self.ctl.transaction(lambda s: issue_token(s, role, sub))

    @contextlib.contextmanager
    def signed_in(self, token: str) -> Iterator[httpx.Client]:
        """A client holding the portal's session cookie for ``token``."""
        with httpx.Client(base_url=self.url, timeout=30) as client:
            answer = client.post("/portal/signin", data={"token": token, "next": "/portal/vms"})
            assert answer.status_code == 303, answer.text
            yield client

    def api(self, method: str, path: str, body: object = None, token: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token or self.owner}"}
        return httpx.request(method, self.url + path, json=body, headers=headers, timeout=30)


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]{64})"', page)
    assert match, "no CSRF field on the page"
    return match.group(1)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    hosts = [FakeHost(n, pool) for n, pool in (("h1", "pool-a"), ("h2", "pool-a"), ("h3", "pool-b"))]
    for h in hosts:
        h.__enter__()
    ctl = FleetController(tmp_path / "ctl", heartbeat_timeout=60.0, lease=2.0, workers=2)
    ctl.start()
    try:
        sock, url = listen_socket("127.0.0.1", 0)
        with ServerThread(create_app(ctl), sock, url):
            s = Site(url, ctl)
            for h in hosts:
                assert s.api("POST", "/providers/Cvmotion.Fabric/hosts/register", h.registration()).status_code == 200
            yield s
    finally:
        ctl.stop()
        for h in hosts:
            h.__exit__()
