"""sim layer: filling the fleet through the controller's API — policy assignments, then VMs by deployment.

Each resource group's VMs go in one ARM deployment (``PUT .../deployments/{name}``: every VM judged by
policy and placed in one transaction), a few deployments at a time; then each VM's operation is polled
until it settles.  The tenants' intent is written to the ground truth before the controller sees a VM.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

from cvmotion.control.builtins import ALLOWED_HOST_POOLS, DENY_CLM
from cvmotion.errors import CvmError
from cvmotion.ipc.http_client import default_ssl_context
from cvmotion.sim.ledger import Ledger
from cvmotion.sim.scenario import SUBSCRIPTION, GroupKind, GroupPlan, Scenario, VmPlan

__all__ = ["ControllerApi", "Populated", "populate"]

_SETTLE_TIMEOUT_S = 1800.0
_STALL_S = 30.0
_DEPLOY_TRIES = 5


class ControllerApi:
    """Owner-token requests to the controller over one keep-alive connection per thread."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token
        self._local = threading.local()
        self._clients: list[httpx.Client] = []
        self._lock = threading.Lock()
        self.calls = 0

    def _client(self) -> httpx.Client:
        client: httpx.Client | None = getattr(self._local, "client", None)
        if client is None:
            client = httpx.Client(
                base_url=self.url,
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=300,
                verify=default_ssl_context(),
            )
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def close(self) -> None:
        """Close every thread's connection (the threads that made them may be gone)."""
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()

    def call(self, method: str, path: str, body: Any = None) -> httpx.Response:
        self.calls += 1
        return self._client().request(method, path, json=body)

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        response = self.call(method, path, body)
        if response.status_code >= 300:
            raise CvmError(f"{method} {path}: HTTP {response.status_code} {response.text[:400]}")
        return response.json()


@dataclass(frozen=True, slots=True)
class Populated:
    created: int
    failed: list[str]
    seconds: float


def _assign(api: ControllerApi, group: GroupPlan) -> None:
    base = f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{group.name}/providers/Microsoft.Authorization"
    if group.kind is GroupKind.POOLS:
        params = {"allowedHostPools": {"value": list(group.pools)}}
        body = {"properties": {"policyDefinitionId": ALLOWED_HOST_POOLS, "parameters": params}}
        api.ok("PUT", f"{base}/policyAssignments/pools", body)
    elif group.kind is GroupKind.NO_LIVE:
        api.ok("PUT", f"{base}/policyAssignments/no-live", {"properties": {"policyDefinitionId": DENY_CLM}})


def _resource(vm: VmPlan) -> dict[str, Any]:
    return {
        "type": "Microsoft.Compute/virtualMachines",
        "name": vm.name,
        "location": "sim",
        "properties": {
            "hardwareProfile": {"vmSize": vm.size},
            "securityProfile": {
                "securityType": "ConfidentialVM",
                "confidentialLiveMigration": "Enabled" if vm.opted_in else "Disabled",
            },
            "storageProfile": {"imageReference": {"id": "kvstore"}},
        },
    }


def _chunks(items: list[VmPlan], size: int) -> Iterator[list[VmPlan]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def populate(
    api: ControllerApi, scenario: Scenario, ledger: Ledger, *, parallel: int = 2, batch: int = 50
) -> Populated:
    """Assign the groups' policies and create every VM; returns how many settled and which failed."""
    t0 = time.monotonic()
    for group in scenario.groups:
        _assign(api, group)
    for vm in scenario.vms:
        ledger.intend(vm.host_name, vm.intent)
    by_group: dict[str, list[VmPlan]] = {}
    for vm in scenario.vms:
        by_group.setdefault(vm.group.name, []).append(vm)
    # Each group's first VM alone, then the rest in batches: the controller remembers a resource group it saw
    # inside a transaction that may still roll back (VmService._ensure_rg), so a group's first deployment is
    # kept small enough never to fail, and only then do its batches run (two at a time).
    firsts = [(g, 0, vms[:1]) for g, vms in by_group.items()]
    rest = [(g, n + 1, chunk) for g, vms in by_group.items() for n, chunk in enumerate(_chunks(vms[1:], batch))]
    operations: dict[str, str] = {}
    with ThreadPoolExecutor(parallel, thread_name_prefix="sim-deploy") as pool:
        for jobs in (firsts, rest):
            for made in pool.map(lambda job: _deploy(api, *job), jobs):
                operations.update(made)
    # The hosts see every create first: no controller reads until they have, or until none came for a while.
    seen, last_change = -1, time.monotonic()
    while ledger.started() < len(operations) and time.monotonic() - last_change < _STALL_S:
        if ledger.started() != seen:
            seen, last_change = ledger.started(), time.monotonic()
        time.sleep(0.5)
    failed = _settle(api, operations)
    return Populated(len(operations) - len(failed), failed, time.monotonic() - t0)


def _deploy(api: ControllerApi, group: str, n: int, chunk: list[VmPlan]) -> dict[str, str]:
    """One ARM deployment; retried (bounded, with backoff) while the controller answers 503."""
    path = f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{group}/providers/Microsoft.Resources/deployments/d{n}"
    body = {"properties": {"template": {"resources": [_resource(vm) for vm in chunk]}}}
    delay = 0.5
    for _ in range(_DEPLOY_TRIES - 1):
        response = api.call("PUT", path, body)
        if response.status_code != 503:
            break
        time.sleep(delay)  # DatabaseUnavailable: the controller asks for a retry
        delay *= 2
    else:
        response = api.call("PUT", path, body)
    if response.status_code >= 300:
        raise CvmError(f"deployment {group}/d{n}: HTTP {response.status_code} {response.text[:400]}")
    answer = response.json()
    return {vm: str(url) for vm, url in answer["properties"]["operations"].items() if url}


def _settle(api: ControllerApi, operations: dict[str, str]) -> list[str]:
    """Poll each operation until it is Succeeded or Failed (bounded); the VMs whose create failed."""
    pending = {vm: url.split("://", 1)[-1].split("/", 1)[-1] for vm, url in operations.items()}
    failed: list[str] = []
    deadline = time.monotonic() + _SETTLE_TIMEOUT_S
    while pending and time.monotonic() < deadline:
        for vm, path in list(pending.items()):
            status = api.ok("GET", "/" + path).get("status")
            if status == "Succeeded":
                del pending[vm]
            elif status == "Failed":
                failed.append(vm)
                del pending[vm]
        if pending:
            time.sleep(0.5)
    return sorted(failed + list(pending))
