"""Signed host-to-host requests (``host.peers``): only a host the pool CA issued a credential to gets through."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from cvmotion.agent.pool import CA_CERT_FILE, create_pool_ca, load_pool_ca
from cvmotion.errors import Unauthorized
from cvmotion.host.peers import SKEW, PeerAuth, issue_host_credential

NOW = dt.datetime(2026, 12, 4, 12, 0, tzinfo=dt.UTC)
PATH = "/v1/migrations/incoming"
BODY = b'{"vm": "web-1"}'


class Clock:
    def __init__(self) -> None:
        self.now = NOW.timestamp()

    def __call__(self) -> float:
        return self.now


def _host(tmp_path: Path, ca_dir: str, name: str, clock: Clock) -> PeerAuth:
    ca_path = tmp_path / ca_dir
    authority = load_pool_ca(ca_path) if (ca_path / CA_CERT_FILE).exists() else create_pool_ca(ca_path, now=NOW)
    directory = tmp_path / name
    directory.mkdir()
    issue_host_credential(authority, directory, host=name, pool="pool-a", now=NOW)
    auth = PeerAuth.load(directory)
    auth.clock = clock
    return auth


@pytest.fixture
def hosts(tmp_path: Path) -> tuple[PeerAuth, PeerAuth, PeerAuth, Clock]:
    clock = Clock()
    return (
        _host(tmp_path, "ca", "host-a", clock),
        _host(tmp_path, "ca", "host-b", clock),
        _host(tmp_path, "other-ca", "outsider", clock),
        clock,
    )


def test_a_signed_request_of_a_pool_host_is_accepted_once(hosts: tuple[PeerAuth, PeerAuth, PeerAuth, Clock]) -> None:
    a, b, _, _ = hosts
    headers = a.sign("POST", PATH, BODY)
    assert b.verify("POST", PATH, BODY, headers) == "host-a"
    with pytest.raises(Unauthorized):
        b.verify("POST", PATH, BODY, headers)  # replayed


@pytest.mark.parametrize(
    "change",
    ["method", "path", "body", "date", "nonce", "signature", "cert", "missing"],
)
def test_every_change_to_a_signed_request_is_refused(
    hosts: tuple[PeerAuth, PeerAuth, PeerAuth, Clock], change: str
) -> None:
    a, b, outsider, _ = hosts
    headers = a.sign("POST", PATH, BODY)
    method, path, body = "POST", PATH, BODY
    if change == "method":
        method = "PUT"
    elif change == "path":
        path = "/v1/migrations/other/outcome"
    elif change == "body":
        body = b'{"vm": "web-2"}'
    elif change == "date":
        headers["x-cvmotion-date"] = str(int(headers["x-cvmotion-date"]) + 1)
    elif change == "nonce":
        headers["x-cvmotion-nonce"] = "00" * 16
    elif change == "signature":
        headers["x-cvmotion-signature"] = outsider.sign("POST", PATH, BODY)["x-cvmotion-signature"]
    elif change == "cert":
        headers["x-cvmotion-host-cert"] = b.sign("POST", PATH, BODY)["x-cvmotion-host-cert"]
    else:
        headers = {}
    with pytest.raises(Unauthorized, match="no valid host credential"):
        b.verify(method, path, body, headers)


def test_a_host_of_another_pool_ca_is_refused(hosts: tuple[PeerAuth, PeerAuth, PeerAuth, Clock]) -> None:
    _, b, outsider, _ = hosts
    with pytest.raises(Unauthorized):
        b.verify("POST", PATH, BODY, outsider.sign("POST", PATH, BODY))


def test_stale_and_future_requests_are_refused(hosts: tuple[PeerAuth, PeerAuth, PeerAuth, Clock]) -> None:
    a, b, _, clock = hosts
    headers = a.sign("GET", PATH, b"")
    clock.now += SKEW + 1
    with pytest.raises(Unauthorized):
        b.verify("GET", PATH, b"", headers)
    clock.now -= 2 * (SKEW + 1)
    with pytest.raises(Unauthorized):
        b.verify("GET", PATH, b"", headers)


def test_a_host_without_a_credential_accepts_nobody(
    tmp_path: Path, hosts: tuple[PeerAuth, PeerAuth, PeerAuth, Clock]
) -> None:
    a = hosts[0]
    empty = PeerAuth.load(tmp_path / "nothing-here")
    with pytest.raises(Unauthorized):
        empty.verify("POST", PATH, BODY, a.sign("POST", PATH, BODY))
