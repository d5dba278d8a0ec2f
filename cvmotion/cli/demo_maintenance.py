"""cli layer: ``cvmotion demo maintenance [--json]`` — a SecurityUpdate drain of a host, every rung of the ladder.

A fleet controller, the emulated KDS and attestation service, and three host daemons on loopback (host-1
and host-2 in pool-a, host-3 in pool-b), each registered with the controller.  On host-1, three VMs:

- ``kv``: kvstore, opted in to confidential live migration, under client load through its stable endpoint;
- ``dirty``: memdirty, not opted in (its memory changes all the time);
- ``pinned``: kvstore, opted in, in a resource group whose policy allows only pool-a.

Then ``POST .../hosts/host-1/drain`` (SecurityUpdate): ``kv`` should move live with no lost write and no
failed request, ``dirty`` pause in place for the host's memory-preserving update (under 1 s), ``pinned``
move live to host-2 only.  The report: the ladder each VM took, its downtime or pause, and the fleet events
a webhook receiver run by the demo was sent (or, when the controller has no webhooks, read from its events
endpoint).  Exit code 0 only when all of that holds.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from cvmotion.errors import CvmError, UsageError

__all__ = ["register_demo_maintenance"]

_VMS = "/subscriptions/default/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines"
_HOSTS = "/providers/Cvmotion.Fabric/hosts"
_EVENT_TYPES = ("cvmotion.maintenance.*", "cvmotion.migration.*", "cvmotion.vm.*")


def register_demo_maintenance(demo: argparse.ArgumentParser) -> None:
    """Adds ``maintenance`` under ``cvmotion demo`` (``demo`` alone still runs the migration demo)."""
    subs = demo.add_subparsers(dest="demo_kind", metavar="DEMO", required=False)
    m = subs.add_parser("maintenance", help="drain a host: live, in place, inside a pool; events by webhook")
    m.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    m.add_argument("--workdir", type=Path, help="keep the fabric's files here (default: a temp dir, removed)")
    m.add_argument("--clients", type=int, default=2, help="client threads on the kv VM (default 2)")
    m.add_argument("--keys-per-client", type=int, default=64)
    m.add_argument("--notice", type=float, default=1.0, metavar="S", help="Scheduled Events' NotBefore (default 1 s)")
    m.add_argument("--seed", type=int, default=1)
    m.set_defaults(handler=_run_demo)


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_demo(args: argparse.Namespace) -> int:
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return _run(args, args.workdir)
    with tempfile.TemporaryDirectory(prefix="cvmotion-maint-") as tmp:
        return _run(args, Path(tmp))


class _Ctl:
    def __init__(self, url: str, token: str) -> None:
        self.url, self.head = url, {"Authorization": f"Bearer {token}"}

    def __call__(self, method: str, path: str, body: Any = None, *, ok: tuple[int, ...] = (200, 201, 202)) -> Any:
        response = httpx.request(method, self.url + path, json=body, headers=self.head, timeout=120)
        if response.status_code not in ok:
            raise CvmError(f"{method} {path}: {response.status_code} {response.text[:400]}")
        return response

    def wait(self, what: str, check: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(0.1)
        raise CvmError(f"timed out waiting for {what}")


def _create(ctl: _Ctl, rg: str, name: str, image: str, clm: str) -> dict[str, Any]:
    props = {
        "hardwareProfile": {"vmSize": "Standard_DC2as_v5"},
        "securityProfile": {"confidentialLiveMigration": clm},
        "storageProfile": {"imageReference": {"id": image}},
        "placement": {"host": "host-1"},
    }
    answer = ctl("PUT", f"{_VMS.format(rg=rg)}/{name}", {"location": "local", "properties": props})
    path = "/" + answer.headers["Azure-AsyncOperation"].split("://", 1)[1].split("/", 1)[1]
    op = ctl.wait(f"{name} to run", lambda: (o := ctl("GET", path).json())["status"] != "InProgress" and o, 300)
    if op["status"] != "Succeeded":
        raise CvmError(f"creating {name} failed: {op.get('error')}")
    vm: dict[str, Any] = ctl("GET", f"{_VMS.format(rg=rg)}/{name}").json()
    return vm


def _webhook(ctl: _Ctl, stack: contextlib.ExitStack) -> Any:
    """A verifying receiver subscribed to the fleet's maintenance events, or None without webhooks."""
    try:
        from cvmotion.control.webhook_receiver import WebhookReceiver
    except ImportError:
        return None
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    receiver = stack.enter_context(WebhookReceiver(secret=secret))
    try:
        ctl("POST", "/v1/webhooks", {"url": receiver.url, "types": list(_EVENT_TYPES), "secret": secret})
    except CvmError:
        return None
    return receiver


def _run(args: argparse.Namespace, root: Path) -> int:  # noqa: C901 - the demo's script, step by step
    from cvmotion.cli.demo import Endpoint, Load, _Portal
    from cvmotion.host.fabric import LocalFabric

    quiet = args.json
    t0 = time.monotonic()
    with LocalFabric(root / "fabric", pool="pool-a") as fabric, contextlib.ExitStack() as stack:
        _say(quiet, "cvmotion demo maintenance — chips and secure processors are EMULATED; the rest is real.\n")
        _say(quiet, "starting: fleet controller, emulated KDS, attestation service ...")
        portal = stack.enter_context(_Portal(root / "controller", f"127.0.0.1:{_free_port()}", fabric.env))
        ctl = _Ctl(portal.url, portal.owner)
        fabric.start_services()
        extra = [*portal.host_args(), "--no-standby"]
        hosts = {}
        for name, pool in (("host-1", "pool-a"), ("host-2", "pool-a"), ("host-3", "pool-b")):
            hosts[name] = fabric.start_host(name, pool=pool, extra=extra).url
            _say(quiet, f"  {name} ({pool}): {hosts[name]}")
        ctl.wait("three hosts", lambda: len(ctl("GET", _HOSTS).json()["value"]) == 3, 60)
        receiver = _webhook(ctl, stack)
        _say(quiet, f"webhook receiver: {receiver.url if receiver else 'none (events read from the controller)'}")
        ctl("PUT", "/subscriptions/default/resourceGroups/restricted/providers/Microsoft.Authorization/"
                   "policyAssignments/pool-a-only",
            {"properties": {"policyDefinitionId": "allowed-host-pools",
                            "parameters": {"allowedHostPools": ["pool-a"]}}})  # fmt: skip
        _say(quiet, "creating on host-1: kv (kvstore, opted in), dirty (memdirty, not opted in), pinned (pool-a only)")
        kv = _create(ctl, "demo", "kv", "kvstore", "Enabled")
        _create(ctl, "demo", "dirty", "memdirty", "Disabled")
        _create(ctl, "restricted", "pinned", "kvstore", "Enabled")

        kv_name = kv["properties"]["instanceView"]["hostVmName"]
        endpoint = Endpoint(list(hosts.values()), kv_name)
        load = Load(endpoint, args.clients, args.seed, keys_per_client=args.keys_per_client)
        load.start()
        if not load.wait_requests(8 * args.clients, 60):
            raise UsageError("the client load got no answers from the kv VM within 60 s")
        _say(quiet, f"client load on kv running ({load.requests} requests so far)\n")
        _say(quiet, "drain host-1 (SecurityUpdate) ...")
        t_drain = time.monotonic()
        ctl("POST", f"{_HOSTS}/host-1/drain", {"reason": "SecurityUpdate", "noticeSeconds": args.notice})
        drain = ctl.wait(
            "the drain to end", lambda: not (d := ctl("GET", f"{_HOSTS}/host-1/drain").json())["active"] and d, 600
        )
        load.wait_requests(load.requests + 8 * args.clients, 30)
        load.finish()
        stall = load.longest_wait(t_drain, time.monotonic())
        lost = _lost_writes(endpoint, load.acked)
        endpoint.close()
        drain_s = time.monotonic() - t_drain
        events, source = _events(ctl, receiver)
        summary = _summary(drain, load, lost, stall, events, source, drain_s, time.monotonic() - t0)
    if args.json:
        print(json.dumps(summary, indent=2), flush=True)
    else:
        _print(summary)
    return 0 if summary["ok"] else 3


def _lost_writes(endpoint: Any, acked: dict[str, str]) -> int:
    lost = 0
    for key, value in acked.items():
        try:
            lost += endpoint.kv("get", key).get("value") != value
        except CvmError:
            lost += 1
    return lost


def _events(ctl: _Ctl, receiver: Any) -> tuple[list[dict[str, Any]], str]:
    if receiver is not None:
        # Delivery is asynchronous: wait (bounded) for the drain's completion to arrive too.
        with contextlib.suppress(Exception):
            receiver.wait_for(
                lambda got: any(r.event.get("type") == "cvmotion.maintenance.completed" for r in got), timeout=30
            )
        return list(receiver.events()), "webhook"
    answer = ctl("GET", "/providers/Cvmotion.Fabric/events?limit=1000").json()
    return [e for e in answer["value"] if str(e.get("type", "")).startswith("cvmotion.")], "events endpoint"


def _summary(
    drain: dict[str, Any], load: Any, lost: int, stall: float, events: list[dict[str, Any]], source: str,
    drain_s: float, wall_s: float,
) -> dict[str, Any]:  # fmt: skip
    vms = {v["name"]: v for v in drain["vms"]}
    kv, dirty, pinned = vms.get("kv", {}), vms.get("dirty", {}), vms.get("pinned", {})
    counts: dict[str, int] = {}
    for e in events:
        counts[e["type"]] = counts.get(e["type"], 0) + 1
    checks = {
        "kv moved live": kv.get("method") == "LiveMigration" and kv.get("outcome") == "Succeeded",
        "kv lost no write": lost == 0,
        "kv had no failed request": load.failed == 0 and load.wrong_reads == 0,
        "dirty paused in place under 1 s": dirty.get("method") == "MemoryPreservingUpdate"
        and dirty.get("outcome") == "Succeeded"
        and (dirty.get("pauseMs") or 1e9) < 1000,
        "pinned moved inside pool-a": pinned.get("method") == "LiveMigration" and pinned.get("to") == "host-2",
        "events received": bool(events),
    }
    return {
        "drain": {"host": drain["host"], "reason": drain["reason"], "status": drain["status"]},
        "vms": [
            {k: v.get(k) for k in ("name", "resourceGroup", "method", "outcome", "from", "to", "downtimeMs",
                                   "pauseMs", "totalMs", "attempts", "reason")}
            for v in drain["vms"]
        ],  # fmt: skip
        "inPlaceUpdate": drain.get("inPlaceUpdate"),
        "load": {
            "requests": load.requests,
            "failed_requests": load.failed,
            "wrong_reads": load.wrong_reads,
            "acknowledged_writes": load.acked_writes,
            "lost_writes": lost,
            "max_client_stall_ms": round(stall * 1000, 1),
        },
        "events": {"source": source, "count": len(events), "by_type": counts,
                   "list": [{"type": e["type"], "subject": e.get("subject"), "data": e.get("data")} for e in events]},
        "checks": checks,
        "ok": all(checks.values()),
        "drain_seconds": round(drain_s, 1),
        "wall_seconds": round(wall_s, 1),
        "platform": "emulated",
    }  # fmt: skip


def _print(s: dict[str, Any]) -> None:
    def ms(value: Any) -> str:
        return "-" if value is None else f"{value:.1f} ms"

    d = s["drain"]
    print(f"\ndrain of {d['host']} ({d['reason']}): {d['status']} in {s['drain_seconds']} s")
    for vm in s["vms"]:
        where = f"{vm['from']} -> {vm['to']}" if vm["to"] and vm["to"] != vm["from"] else f"stays on {vm['from']}"
        print(f"  {vm['name']:<7} {vm['method']:<23} {vm['outcome'] or '-':<9} {where:<22}"
              f" downtime {ms(vm['downtimeMs'])}  pause {ms(vm['pauseMs'])}  attempts {vm['attempts']}")  # fmt: skip
        if vm["reason"]:
            print(f"          why: {vm['reason'][:110]}")
    load = s["load"]
    print(f"client load on kv: {load['requests']} requests, {load['failed_requests']} failed, "
          f"{load['lost_writes']} lost writes, longest stall {load['max_client_stall_ms']} ms")  # fmt: skip
    ev = s["events"]
    print(f"events ({ev['source']}): {ev['count']}")
    for kind, count in sorted(ev["by_type"].items()):
        print(f"  {count:3d} {kind}")
    for e in ev["list"]:
        if e["type"] in ("cvmotion.vm.postMigrationAttestation", "cvmotion.maintenance.fallback"):
            print(f"  {e['type']}: {json.dumps(e['data'])[:200]}")
    for check, ok in s["checks"].items():
        print(f"  [{'ok' if ok else 'FAILED'}] {check}")
