"""Benchmark: the fleet controller — placements per second, policy evaluations per second with 100
assignments, and API latency percentiles at 16 concurrent clients, on SQLite and on PostgreSQL.

A real ``cvmotion controller serve`` process on loopback; the hosts are simulated by the host API contract
(``cvmotion.testing.fakehost``, in this process) so the figure is the controller's, not KVM's.  A VM create
is a PUT that judges policy, places the VM (capacity counted from the database, host rows locked) and
writes the VM and operation rows in one transaction (answer: 202); "settled" is when every operation's
worker has created the VM on its host and recorded it.  Policy evaluations: one request judged against 100
assignments in scope, compiled (``policy.evaluate``) and with the database round trip (``judge``).

Usage: .venv/bin/python bench/controller_bench.py [--vms 600] [--clients 16] [--hosts 8] [--db sqlite postgresql]
       [--replicas N] (controller processes on the PostgreSQL database; clients spread over them)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_facts, wait_quiet

from cvmotion.control.builtins import ALLOWED_HOST_POOLS, BUILTINS, DENY_CLM
from cvmotion.control.policy import compile_definition, evaluate, resolve_parameters
from cvmotion.control.policy_store import PolicyStore
from cvmotion.control.service import FleetController
from cvmotion.testing.controller import ControllerProcess
from cvmotion.testing.fakehost import FakeHost
from cvmotion.testing.postgres import PostgresServer

VMS = "/subscriptions/bench/resourceGroups/rg{g}/providers/Microsoft.Compute/virtualMachines/vm{i}"
BODY = {
    "properties": {
        "hardwareProfile": {"vmSize": "Standard_DC2as_v5"},
        "securityProfile": {"confidentialLiveMigration": "Enabled"},
        "storageProfile": {"imageReference": {"id": "kvstore"}},
    }
}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _run_clients(
    clients: int, jobs: list[tuple[str, str, Any]], url: str | list[str], token: str
) -> tuple[float, list[float]]:
    """Run ``jobs`` (method, path, body) over ``clients`` keep-alive connections; (seconds, latencies in ms).

    ``url``: one controller, or several replicas (client k talks to replica k mod n, as a load balancer would).
    """
    urls = [url] if isinstance(url, str) else url
    latencies: list[float] = []
    lock = threading.Lock()
    cursor = iter(jobs)
    failures: list[str] = []

    auth = {"Authorization": f"Bearer {token}"}

    def client(k: int) -> None:
        with httpx.Client(base_url=urls[k % len(urls)], headers=auth, timeout=60) as http:
            while True:
                with lock:
                    job = next(cursor, None)
                if job is None:
                    return
                t0 = time.perf_counter()
                response = http.request(job[0], job[1], json=job[2])
                took = (time.perf_counter() - t0) * 1000
                with lock:
                    latencies.append(took)
                    if response.status_code >= 300:
                        failures.append(f"{job[0]} {job[1]}: {response.status_code} {response.text[:200]}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if failures:
        raise SystemExit(f"{len(failures)} requests failed, e.g. {failures[0]}")
    return elapsed, latencies


def _settle(ctl: ControllerProcess, groups: int, count: int, timeout: float = 600.0) -> float:
    t0 = time.perf_counter()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = 0
        for g in range(groups):
            listing = ctl.api(
                "GET", f"/subscriptions/bench/resourceGroups/rg{g}/providers/Microsoft.Compute/virtualMachines"
            )
            done += sum(v["properties"]["provisioningState"] == "Succeeded" for v in listing.json()["value"])
        if done >= count:
            return time.perf_counter() - t0
        time.sleep(0.2)
    raise SystemExit("operations did not settle")


def bench_api(db: str | None, label: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    hosts = [FakeHost(f"h{i}", f"pool-{i % 2}") for i in range(args.hosts)]
    for h in hosts:
        h.__enter__()
    # Several replicas on one PostgreSQL database (each its own process), one on a SQLite file.
    replicas = args.replicas if db is not None else 1
    ctls = [ControllerProcess(root / f"{label}-{r}", db) for r in range(replicas)]
    try:
        for ctl in ctls:
            ctl.start()
        ctl = ctls[0]
        urls = [c.url for c in ctls]
        for h in hosts:
            body = h.registration(vcpus=4096, memory_gib=65536)
            ctl.api("POST", "/providers/Cvmotion.Fabric/hosts/register", body).raise_for_status()
        groups = 8
        creates = [("PUT", VMS.format(g=i % groups, i=i), BODY) for i in range(args.vms)]
        load_before = os.getloadavg()[0]
        seconds, put_ms = _run_clients(args.clients, creates, urls, ctl.owner_token)
        load_after = os.getloadavg()[0]
        settled = _settle(ctl, groups, args.vms) + seconds
        gets = [("GET", VMS.format(g=i % groups, i=i), None) for i in range(args.vms)]
        get_seconds, get_ms = _run_clients(args.clients, gets, urls, ctl.owner_token)
        copies = sum(len(h.vms) for h in hosts)
        assert copies == args.vms, f"{copies} VMs on hosts, {args.vms} created"
        return {
            "database": label,
            "replicas": replicas,
            "placements_per_s": round(args.vms / seconds, 1),
            "creates_settled_per_s": round(args.vms / settled, 1),
            "put_p50_ms": round(statistics.median(put_ms), 1),
            "put_p99_ms": round(_pct(put_ms, 0.99), 1),
            "get_per_s": round(args.vms / get_seconds, 1),
            "get_p50_ms": round(statistics.median(get_ms), 1),
            "get_p99_ms": round(_pct(get_ms, 0.99), 1),
            "load_1min_before_after": f"{load_before:.2f} / {load_after:.2f}",
        }
    finally:
        for ctl in ctls:
            ctl.kill()
        for h in hosts:
            h.__exit__()


def _hundred_assignments() -> list[tuple[str, Any, Any]]:
    deny = compile_definition(DENY_CLM, BUILTINS[DENY_CLM])
    pools = compile_definition(ALLOWED_HOST_POOLS, BUILTINS[ALLOWED_HOST_POOLS])
    out = []
    for i in range(100):
        if i % 2:
            out.append((f"a{i}", pools, resolve_parameters(pools, {"allowedHostPools": [f"p{i}", "pool-0", "pool-1"]})))
        else:
            out.append((f"a{i}", deny, resolve_parameters(deny, {"effect": "audit"})))
    return out


def _doc() -> dict[str, Any]:
    return {
        "id": "/subscriptions/bench/resourceGroups/rg0/providers/Microsoft.Compute/virtualMachines/x",
        "name": "x",
        "type": "Microsoft.Compute/virtualMachines",
        "location": "local",
        "tags": {},
        "properties": BODY["properties"] | {"extended": {"hostPool": "pool-0", "hostName": "h0"}},
    }


def bench_policy_compiled(seconds: float = 3.0) -> dict[str, Any]:
    assignments, doc = _hundred_assignments(), _doc()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(100):
            evaluate(assignments, doc)
        n += 100
    elapsed = time.perf_counter() - t0
    return {"requests_per_s": round(n / elapsed), "assignment_evaluations_per_s": round(100 * n / elapsed)}


def bench_policy_db(db: str | None, label: str, root: Path, seconds: float = 3.0) -> dict[str, Any]:
    """``judge`` with its database read of the 100 assignments in scope, in-process (no HTTP)."""
    ctl = FleetController(root / f"policy-{label}", db, workers=0)
    try:
        ctl.start()
        store = PolicyStore()
        with ctl.session() as s:
            for i in range(100):
                scope = "/subscriptions/bench" if i % 3 else "/subscriptions/bench/resourceGroups/rg0"
                params: dict[str, Any] = {"allowedHostPools": [f"p{i}", "pool-0"]} if i % 2 else {"effect": "audit"}
                store.put_assignment(s, scope, f"a{i}", ALLOWED_HOST_POOLS if i % 2 else DENY_CLM, params)
        doc = _doc()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            with ctl.session() as s:
                verdicts = store.judge(s, doc, record=False)
            n += 1
        assert len(verdicts) == 100
        return {"database": label, "judge_per_s": round(n / (time.perf_counter() - t0))}
    finally:
        ctl.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=600)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--db", nargs="+", default=["sqlite", "postgresql"], choices=("sqlite", "postgresql"))
    parser.add_argument("--replicas", type=int, default=1, help="controller processes on the PostgreSQL database")
    parser.add_argument("--quiet-load", type=float, default=1.5, help="wait (at most 60 s) for a 1-min load below")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    load = wait_quiet(args.quiet_load, 60)
    results: dict[str, Any] = {"machine": machine_facts({"load_at_start": f"{load:.2f}"})}
    results["policy_compiled_100_assignments"] = bench_policy_compiled()
    pg = PostgresServer.find() if "postgresql" in args.db else None
    if "postgresql" in args.db and pg is None:
        print("PostgreSQL binaries not found: skipping PostgreSQL", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="cvmotion-ctl-bench-") as tmp:
        root = Path(tmp)
        results["api"], results["policy_db"] = [], []
        targets: list[tuple[str | None, str]] = []
        if "sqlite" in args.db:
            targets.append((None, "sqlite"))
        if pg is not None:
            pg.start()
            targets.append((pg.database(), "postgresql"))
        try:
            for db, label in targets:
                results["policy_db"].append(bench_policy_db(db if db else None, label, root))
                api_db = db if db is None else pg.database() if pg is not None else db
                results["api"].append(bench_api(api_db, label, args, root))
        finally:
            if pg is not None:
                pg.stop()
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(results["machine"])
    compiled = results["policy_compiled_100_assignments"]
    console.print(
        f"policy, 100 assignments, compiled: {compiled['requests_per_s']:,} requests/s"
        f" ({compiled['assignment_evaluations_per_s']:,} assignment evaluations/s)"
    )
    table = Table("database", "replicas", "placements/s", "creates settled/s", "PUT p50/p99 ms", "GET/s",
                  "GET p50/p99 ms", "judge (DB read + 100)/s", "load before/after")  # fmt: skip
    for api, pol in zip(results["api"], results["policy_db"], strict=True):
        table.add_row(
            api["database"], str(api["replicas"]), str(api["placements_per_s"]), str(api["creates_settled_per_s"]),
            f"{api['put_p50_ms']} / {api['put_p99_ms']}", str(api["get_per_s"]),
            f"{api['get_p50_ms']} / {api['get_p99_ms']}", str(pol["judge_per_s"]), api["load_1min_before_after"],
        )  # fmt: skip
    console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
