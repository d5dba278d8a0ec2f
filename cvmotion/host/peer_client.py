"""host layer: this host's calls to other hosts — the two host-to-host endpoints, typed and signed.

``incoming`` asks a destination to receive a VM (``POST /v1/migrations/incoming``) and returns where to send
it; ``outcome`` asks it for a verdict (``GET /v1/migrations/{id}/outcome``). Both are signed with this host's
pool-issued credential (``host.peers``). A verdict is only ever a carrier: its token is checked by the
source's firmware, never trusted here.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from cvmotion.errors import UsageError
from cvmotion.host.peers import PeerAuth
from cvmotion.ipc.envelope import parse_error
from cvmotion.ipc.http_client import default_ssl_context
from cvmotion.migration.sender import Destination

__all__ = ["PeerClient"]


class PeerClient:
    """Signed calls from this host to another host's API."""

    def __init__(self, auth: PeerAuth, *, incoming_timeout: float = 70.0, outcome_timeout: float = 5.0) -> None:
        self.auth = auth
        self.incoming_timeout = incoming_timeout
        self.outcome_timeout = outcome_timeout

    def incoming(self, url: str, body: dict[str, Any]) -> Destination:
        """Have the destination at ``url`` prepare to receive a VM; where the streams must go.

        Raises:
            UsageError: the destination is unreachable or refused (its error message is passed on).
        """
        target = f"{url.rstrip('/')}/v1/migrations/incoming"
        content = json.dumps(body).encode()
        try:
            headers = {"content-type": "application/json", **self.auth.sign("POST", httpx.URL(target).path, content)}
            response = httpx.post(
                target, content=content, headers=headers, timeout=self.incoming_timeout, verify=default_ssl_context()
            )
        except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
            raise UsageError(f"destination {url} is unreachable: {exc}") from exc
        if response.status_code != 200:
            raise UsageError(f"destination {url} refused the migration: {error_text(response)}")
        try:
            data = response.json()
            return Destination(
                host=str(data["host"]),
                port=int(data["port"]),
                ticket=str(data["ticket"]),
                migration_id=str(data["migration"]),
                name=str(data.get("name", "")),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"destination {url} answered the migration request with nonsense: {exc!r}") from None

    def outcome(self, url: str, migration: str) -> dict[str, Any] | None:
        """The destination's verdict document, or None when it gave none (unreachable, an error, not JSON)."""
        target = f"{url.rstrip('/')}/v1/migrations/{migration}/outcome"
        try:
            headers = self.auth.sign("GET", httpx.URL(target).path, b"")
            response = httpx.get(target, headers=headers, timeout=self.outcome_timeout, verify=default_ssl_context())
            answer = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, httpx.InvalidURL, ValueError):
            return None
        return answer if isinstance(answer, dict) else None


def error_text(response: httpx.Response) -> str:
    """The message of a host API error envelope, or the bare status."""
    try:
        data = response.json()
    except ValueError:
        data = None
    return parse_error(response.status_code, data).message
