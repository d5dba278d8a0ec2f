"""control layer: the controller's client of a host daemon's HTTP API (the only way it reaches a host)."""

from __future__ import annotations

import threading
from typing import Any

import httpx

from cvmotion.control.errors import HostUnreachable
from cvmotion.errors import Conflict, CvmError, NotFound, UsageError

__all__ = ["HostApi"]

_shared: list[httpx.Client] = []
_shared_lock = threading.Lock()


def _client() -> httpx.Client:
    """One keep-alive client for every host call of this process (thread-safe).

    ``httpx.request`` builds a client, and with it a TLS context, per call: milliseconds of CPU each,
    which was most of what an operation worker spent on a create.
    """
    if not _shared:
        with _shared_lock:
            if not _shared:
                limits = httpx.Limits(max_connections=200, max_keepalive_connections=64, keepalive_expiry=30)
                _shared.append(httpx.Client(limits=limits))
    return _shared[0]


class HostApi:
    """``method path`` against one host; errors become ``NotFound``/``Conflict``/``UsageError``/``CvmError``."""

    def __init__(self, base_url: str, *, timeout: float = 30.0) -> None:
        self.base = base_url.rstrip("/")
        self.timeout = timeout

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        try:
            response = _client().request(method, self.base + path, json=body, timeout=timeout or self.timeout)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:  # InvalidURL: a registered URL httpx cannot use
            raise HostUnreachable(f"host {self.base} did not answer {method} {path}: {exc}") from None
        try:
            data = response.json()
        except ValueError:
            data = {}
        if response.status_code < 300:
            return data
        error = data.get("error", {}) if isinstance(data, dict) else {}
        message = f"host {self.base}: {error.get('message') or response.text[:300]}"
        if response.status_code in (404, 307):  # 307: the VM moved away (a completed migration)
            raise NotFound(message)
        if response.status_code == 409:
            raise Conflict(message)
        if response.status_code < 500:
            raise UsageError(message)
        raise CvmError(message)

    def get_vm(self, name: str) -> dict[str, Any] | None:
        try:
            vm = self.call("GET", f"/v1/vms/{name}")
        except NotFound:
            return None
        return vm if isinstance(vm, dict) else None

    def migration(self, mig_id: str, *, wait: float = 0.0) -> dict[str, Any]:
        """``GET /v1/migrations/{id}``; ``wait`` > 0 long-polls: the host answers once the migration settles or
        after ``wait`` seconds, whichever comes first (a host that ignores it answers at once)."""
        query = f"?wait={wait:g}" if wait > 0 else ""
        answer: dict[str, Any] = self.call("GET", f"/v1/migrations/{mig_id}{query}", timeout=wait + self.timeout)
        return answer

    # -- maintenance (the host side of a drain) ------------------------------------------------------

    def start_maintenance(self, maintenance_id: str) -> dict[str, Any]:
        """``POST /v1/host/maintenance``: idempotent by id (the same id returns the same record)."""
        body = {"id": maintenance_id, "kind": "MemoryPreservingUpdate"}
        answer: dict[str, Any] = self.call("POST", "/v1/host/maintenance", body, timeout=30)
        return answer

    def maintenance(self, maintenance_id: str) -> dict[str, Any]:
        answer: dict[str, Any] = self.call("GET", f"/v1/host/maintenance/{maintenance_id}", timeout=10)
        return answer

    def put_scheduled_events(self, name: str, document: dict[str, Any]) -> dict[str, Any]:
        answer: dict[str, Any] = self.call("PUT", f"/v1/vms/{name}/scheduledevents", document, timeout=10)
        return answer

    def scheduled_events(self, name: str) -> dict[str, Any]:
        """``{"document", "startRequests"}``: the stored document and the guest's early approvals."""
        answer: dict[str, Any] = self.call("GET", f"/v1/vms/{name}/scheduledevents", timeout=10)
        return answer

    def attestation(self, name: str) -> dict[str, Any]:
        """The VM's current attestation (token id, chip, TCB, platform); empty when the host has none."""
        try:
            answer = self.call("GET", f"/v1/vms/{name}/attestation", timeout=10)
        except CvmError:  # no VM, no process, no answer: nothing to report (it is informational)
            return {}
        return answer if isinstance(answer, dict) else {}
