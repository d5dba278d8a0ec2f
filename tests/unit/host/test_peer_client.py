"""The peer client turns every way a destination URL can fail into one clear error (or no verdict), never a
traceback: unreachable, not a URL, a host name no DNS label can hold."""

from __future__ import annotations

import pytest

from cvmotion.errors import UsageError
from cvmotion.host.peer_client import PeerClient
from cvmotion.host.peers import PeerAuth


class _Signer(PeerAuth):
    def sign(self, method: str, path: str, body: bytes) -> dict[str, str]:
        return {}


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9", "http://" + "x" * 64 + ".example", "http://[::1", "nonsense"], ids=str
)
def test_a_bad_destination_is_a_usage_error_or_no_answer(url: str) -> None:
    client = PeerClient(_Signer(cas=()), incoming_timeout=2, outcome_timeout=2)
    with pytest.raises(UsageError, match="unreachable"):
        client.incoming(url, {"vm": "web-1"})
    assert client.outcome(url, "abc") is None
