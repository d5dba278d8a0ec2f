"""sim layer: the maintenance wave — every host, fault domain by fault domain, every host of a domain at once.

Two drivers.  **drain API** (``--driver auto`` when the controller serves ``POST …/hosts/{name}/drain``):
each host is drained with the domain's reason (the last domain ``HardwareRefresh``, the others
``SecurityUpdate``), ``maxParallel`` per host and a ``noticeSeconds`` compressed like the hosts' time; the
controller walks each VM's ladder itself (``sim.drainwave``), then the host is uncordoned.  **migrate API**
(``--driver migrate``): the driver plays the operator's part — per host, with at most ``per_host`` moves in
flight (KubeVirt's ``parallelOutboundMigrationsPerNode``, 2), it asks the controller to live-migrate each VM
the host runs (the controller refuses the ones not opted in or denied by policy, 409/403, and places the
others), for a few rounds (VMs placed onto the host meanwhile move too), then updates the host in place
(``POST /v1/host/maintenance`` on the host), pausing whatever is still there; no redeploys on this path.
Every host of the domain is cordoned through the controller before its first move and uncordoned once
updated, as an operator running maintenance outside a drain does.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from cvmotion.ipc.http_client import default_ssl_context
from cvmotion.sim.drainwave import HOSTS, has_drain_api, run_drain
from cvmotion.sim.hosts import SimFleet, SimHost
from cvmotion.sim.populate import ControllerApi
from cvmotion.sim.scenario import SUBSCRIPTION, Scenario, VmPlan
from cvmotion.sim.watch import OperationWatch
from cvmotion.sim.waveplan import HostResult, VmStep, WaveOptions, WaveResult

__all__ = ["run_wave"]

COMPLETION_S_PER_GIB = 150.0  # KubeVirt's completionTimeoutPerGiB (virtual seconds)
CONTROLLER_SLACK_S = 120.0  # wall seconds a move may wait on the controller beyond that
_MAINTENANCE_POLL_S = 0.2


class _Driver:
    def __init__(
        self,
        api: ControllerApi,
        watch: OperationWatch | None,
        fleet: SimFleet,
        scenario: Scenario,
        options: WaveOptions,
    ) -> None:
        self.api, self.watch, self.fleet, self.scenario, self.options = api, watch, fleet, scenario, options
        self.plans = scenario.by_host_name
        self._local = threading.local()
        self._clients: list[httpx.Client] = []
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()

    def _hosts_client(self) -> httpx.Client:
        client: httpx.Client | None = getattr(self._local, "client", None)
        if client is None:
            client = httpx.Client(base_url=self.fleet.api_prefix, timeout=30, verify=default_ssl_context())
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def _on_host(self, host: SimHost) -> list[VmPlan]:
        with self.fleet.lock:
            names = [name for name, vm in host.vms.items() if vm.state == "running"]
        return [self.plans[n] for n in names if n in self.plans]

    def drain(self, host: SimHost, t0: float) -> HostResult:
        result = HostResult(host.name, host.zone, time.monotonic() - t0)
        refused: set[str] = set()
        try:
            for _ in range(self.options.rounds):
                todo = [vm for vm in self._on_host(host) if vm.name not in refused]
                if not todo:
                    break
                with ThreadPoolExecutor(self.options.per_host, thread_name_prefix=f"move-{host.name}") as pool:
                    steps = list(pool.map(lambda vm: self._move(host, vm), todo))
                result.steps += steps
                refused |= {s.vm for s in steps if s.outcome != "Succeeded"}
            result.inplace = self._update_in_place(host)
            self.api.ok("POST", f"{HOSTS}/{host.name}/uncordon")  # updated: a destination again
        except Exception as exc:  # one host's trouble is its row in the report, not the wave's end
            result.status, result.error = "Failed", f"{type(exc).__name__}: {exc}"[:300]
        if result.status != "Failed" and any(s.outcome == "Failed" for s in result.steps):
            result.status = "PartiallySucceeded"
        result.ended = time.monotonic() - t0
        return result

    def cordon(self, domain: list[SimHost], fd: str) -> None:
        """Every host of the domain stops being a destination before any of its VMs moves (``kubectl cordon``):
        a VM moved off one of them never lands on another only to move again, nor on one about to pause."""
        body = {"reason": f"maintenance wave: fault domain {fd}"}
        with ThreadPoolExecutor(8, thread_name_prefix=f"cordon-{fd}") as pool:
            list(pool.map(lambda h: self.api.ok("POST", f"{HOSTS}/{h.name}/cordon", body), domain))

    def _move(self, host: SimHost, vm: VmPlan) -> VmStep:
        group = f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{vm.group.name}"
        path = f"{group}/providers/Microsoft.Compute/virtualMachines/{vm.name}/migrate"
        response = self.api.call("POST", path)
        if response.status_code in (403, 409):
            message = str(_error(response))
            return VmStep(vm.name, host.name, "None", "Blocked", message[:300])
        if response.status_code != 202:
            return VmStep(vm.name, host.name, "None", "Failed", f"HTTP {response.status_code}: {response.text[:200]}")
        body = response.json()
        location = response.headers["Azure-AsyncOperation"].split("://", 1)[-1].split("/", 1)[-1]
        memory = self.fleet.hosts[host.name].vms.get(vm.host_name)
        gib = memory.memory_gib if memory else 8.0
        timeout = COMPLETION_S_PER_GIB * gib / self.fleet.clock.speed + CONTROLLER_SLACK_S
        if self.watch is None:
            raise RuntimeError("the per-VM driver runs only with an operation watch")
        status, view = self.watch.wait(str(body["operation"]), "/" + location, timeout)
        error = view.get("error")
        reason = str(error.get("message", "")) if isinstance(error, dict) else ""
        outcome = "Succeeded" if status == "Succeeded" else "Failed"
        method = "LiveMigration" if outcome == "Succeeded" else "None"
        return VmStep(vm.name, host.name, method, outcome, reason[:300] or status, str(body.get("targetHost", "")))

    def _update_in_place(self, host: SimHost) -> int:
        """The in-place update through the host API; retried (bounded) while the host does not answer."""
        client = self._hosts_client()
        mid = f"wave-{host.name}"
        deadline = time.monotonic() + self.options.host_timeout_s
        delay = 0.5
        while True:
            try:
                response = client.post(
                    f"/h/{host.name}/v1/host/maintenance", json={"id": mid, "kind": "MemoryPreservingUpdate"}
                )
                if response.status_code >= 300:
                    raise RuntimeError(f"maintenance refused: HTTP {response.status_code} {response.text[:200]}")
                while True:
                    record: dict[str, Any] = client.get(f"/h/{host.name}/v1/host/maintenance/{mid}").json()
                    if record["status"] != "InProgress":
                        return sum(v["outcome"] == "Succeeded" for v in record["vms"])
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"maintenance of {host.name} still InProgress")
                    time.sleep(_MAINTENANCE_POLL_S)
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(delay)  # the host is down: wait for it to come back
                delay = min(delay * 2, 5.0)


def _error(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:300]


def _schedule_failures(
    fleet: SimFleet, options: WaveOptions, rng: random.Random, domain: list[SimHost], count: int
) -> list[str]:
    """``count`` hosts of the domain about to be drained go down within its first seconds, then come back."""
    names = []
    speed = fleet.clock.speed
    for host in rng.sample(domain, min(count, len(domain))):
        at = fleet.clock.now() + rng.uniform(0.0, 5.0) * speed
        fleet.fail_host(host, at, rng.uniform(*options.failure_wall_s) * speed)
        names.append(host.name)
    return names


def reason_for(index: int, count: int) -> str:
    """The last fault domain's hardware is refreshed (every VM must leave); the others get a security update."""
    return "HardwareRefresh" if count > 1 and index == count - 1 else "SecurityUpdate"


def _through_drain_api(api: ControllerApi, host: SimHost, reason: str, options: WaveOptions, t0: float) -> HostResult:
    result = HostResult(host.name, host.zone, time.monotonic() - t0)
    try:
        record = run_drain(api, host, reason, options.per_host, options.notice_s, options.host_timeout_s)
        result.status = str(record.get("status"))
        for vm in record.get("vms", []):
            method, outcome = str(vm.get("method", "None")), str(vm.get("outcome", ""))
            step = VmStep(
                str(vm.get("name")), host.name, method, outcome, str(vm.get("reason") or ""), str(vm.get("to") or "")
            )
            result.steps.append(step)
            result.inplace += method == "MemoryPreservingUpdate" and outcome == "Succeeded"
    except Exception as exc:  # one host's trouble is its row in the report, not the wave's end
        result.status, result.error = "Failed", f"{type(exc).__name__}: {exc}"[:300]
    result.ended = time.monotonic() - t0
    return result


def run_wave(api: ControllerApi, fleet: SimFleet, scenario: Scenario, options: WaveOptions) -> WaveResult:
    """The wave; through the controller's drain API when it serves one, else the per-VM migrate API."""
    rng = random.Random(options.seed)
    drain_api = options.driver != "migrate" and has_drain_api(api)
    watch = OperationWatch(api) if not drain_api else None
    driver = _Driver(api, watch.start() if watch else None, fleet, scenario, options)
    t0 = time.monotonic()
    v0 = fleet.clock.now()
    domains: list[tuple[str, float, float, str]] = []
    results: list[HostResult] = []
    failed: list[str] = []
    count = len(scenario.fault_domains)
    per_domain = [options.failures // count + (i < options.failures % count) for i in range(count)]
    try:
        for i, (fd, failures) in enumerate(zip(scenario.fault_domains, per_domain, strict=True)):
            hosts = [h for h in fleet.hosts.values() if h.zone == fd]
            start = time.monotonic() - t0
            failed += _schedule_failures(fleet, options, rng, hosts, failures)
            reason = reason_for(i, count)
            if not drain_api:
                driver.cordon(hosts, fd)  # a drain cordons its host itself

            def one(host: SimHost, reason: str = reason) -> HostResult:
                if drain_api:
                    return _through_drain_api(api, host, reason, options, t0)
                return driver.drain(host, t0)

            with ThreadPoolExecutor(max(1, len(hosts)), thread_name_prefix=f"drain-{fd}") as pool:
                results += list(pool.map(one, hosts))
            domains.append((fd, start, time.monotonic() - t0, reason if drain_api else "SecurityUpdate"))
    finally:
        if watch is not None:
            watch.close()
        driver.close()
    mode = "drain-api" if drain_api else "migrate-api"
    return WaveResult(mode, 0.0, time.monotonic() - t0, v0, fleet.clock.now(), domains, results, failed)
