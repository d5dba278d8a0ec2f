"""sim layer: one host's turn in the wave through the controller's drain API (when the controller has one).

``POST …/hosts/{host}/drain`` with the wave's reason and per-host limit, the drain polled (bounded, with
backoff) until it ends, its per-VM ladder taken from the drain's own record, then ``uncordon`` so the
updated host takes VMs again.  The controller walks the ladder (live → in place → redeploy) and talks to
the hosts; the driver only asks and waits.
"""

from __future__ import annotations

import time
from typing import Any

from cvmotion.sim.hosts import SimHost
from cvmotion.sim.populate import ControllerApi

__all__ = ["DRAIN_PATH", "has_drain_api", "run_drain"]

HOSTS = "/providers/Cvmotion.Fabric/hosts"
DRAIN_PATH = HOSTS + "/{name}/drain"
_ACTIVE = ("Accepted", "Running", "Canceling", "InProgress")
_POLL_MAX_S = 2.0


def has_drain_api(api: ControllerApi) -> bool:
    """Whether the controller's OpenAPI document has the host drain route."""
    response = api.call("GET", "/openapi.json")
    return response.status_code == 200 and DRAIN_PATH in response.json().get("paths", {})


def run_drain(
    api: ControllerApi, host: SimHost, reason: str, per_host: int, notice_s: float, timeout_s: float
) -> dict[str, Any]:
    """Drain ``host`` and wait for the drain to end; the drain's final record (``vms``: the ladder per VM)."""
    path = DRAIN_PATH.format(name=host.name)
    body = {"reason": reason, "maxParallel": per_host, "noticeSeconds": notice_s}
    started = api.call("POST", path, body)
    if started.status_code >= 300:
        raise RuntimeError(f"drain of {host.name} refused: HTTP {started.status_code} {started.text[:300]}")
    deadline = time.monotonic() + timeout_s
    poll = 0.25
    while True:
        record: dict[str, Any] = api.ok("GET", path)
        if record.get("status") not in _ACTIVE:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"drain of {host.name} still {record.get('status')} after {timeout_s:.0f} s")
        time.sleep(poll)
        poll = min(_POLL_MAX_S, poll * 1.5)
    api.ok("POST", f"{HOSTS}/{host.name}/uncordon")
    return record
