"""cli layer: ``cvmotion demo`` — the main job: live-migrate a confidential kvstore VM under client load.

Starts a fabric on loopback (emulated KDS, attestation service, key-release service, two host daemons with
their emulated secure processors), launches a kvstore CVM on host-a (its paravisor attests and fetches the
data key), drives a client load through a stable endpoint (the VM's name, resolved to whichever host runs it),
live-migrates the VM to host-b, and checks: every acknowledged write is still there, the destination's
secure processor signed a fresh report, the token was renewed (new chip id), the data key was released again.
``--json`` prints one object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

from cvmotion.cli._http import api
from cvmotion.errors import CvmError, UsageError
from cvmotion.ipc.http_client import default_ssl_context

__all__ = ["register"]

VM = "kvdemo"
_TOKEN_FIELDS = ("jti", "chip_id", "tcb", "platform", "data_key")
KEY_NAME = "kvdemo-data-key"
# Each client cycles through this many keys of its own, overwriting values: the store holds at most
# clients x KEYS_PER_CLIENT keys however fast the clients run, and a read-back checks the latest value
# (an older one would be a rollback).
KEYS_PER_CLIENT = 256
PORTAL_LISTEN = "127.0.0.1:8791"  # the controller (and its web portal) of ``demo --serve``


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = subparsers.add_parser("demo", help="the main job: live-migrate a confidential VM under load")
    demo.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    demo.add_argument("--workdir", type=Path, help="keep the fabric's files here (default: a temp dir, removed)")
    demo.add_argument("--memory", default="64M", help="guest RAM (default 64M)")
    demo.add_argument("--load-seconds", type=float, default=2.0, help="client load before the migration starts")
    demo.add_argument("--clients", type=int, default=2, help="client threads (default 2)")
    demo.add_argument(
        "--keys-per-client",
        type=int,
        default=KEYS_PER_CLIENT,
        help=f"each client rewrites its own keys round-robin (default {KEYS_PER_CLIENT})",
    )
    demo.add_argument("--downtime-limit", type=float, default=300.0, metavar="MS")
    demo.add_argument("--streams", type=int, default=2)
    demo.add_argument("--seed", type=int, default=1)
    demo.add_argument(
        "--serve",
        action="store_true",
        help="run the hosts under a fleet controller and keep everything running afterwards: browse the portal",
    )
    demo.add_argument("--portal-listen", default=PORTAL_LISTEN, metavar="ADDR", help=f"default {PORTAL_LISTEN}")
    demo.set_defaults(handler=_demo)


class Endpoint:
    """The VM's stable endpoint: its name; requests go to whichever host runs it, retried across a move."""

    def __init__(self, hosts: list[str], name: str, *, retry_for: float = 15.0) -> None:
        self.hosts = hosts
        self.name = name
        self.retry_for = retry_for
        self.current = hosts[0]
        self._lock = threading.Lock()
        self._client = httpx.Client(timeout=10.0, verify=default_ssl_context())

    def _resolve(self) -> None:
        for host in self.hosts:
            try:
                vm = self._client.get(f"{host}/v1/vms/{self.name}")
            except httpx.HTTPError:
                continue
            if vm.status_code == 200 and vm.json().get("state") == "running":
                with self._lock:
                    self.current = host
                return

    def kv(self, op: str, key: str, value: str = "") -> dict[str, Any]:
        deadline = time.monotonic() + self.retry_for
        while True:
            host = self.current
            try:
                response = self._client.post(
                    f"{host}/v1/vms/{self.name}/kv", json={"op": op, "key": key, "value": value}
                )
                if response.status_code == 200:
                    return dict(response.json())
                moved_to = self._host_of(response.headers.get("location", "")) if response.status_code == 307 else None
            except httpx.HTTPError:
                moved_to = None
            if time.monotonic() > deadline:
                raise CvmError(f"{op} {key}: no host answered for {self.retry_for:.0f} s")
            if moved_to is not None and moved_to != host:
                # The source says where the VM went (a completed live migration): go there at once.
                with self._lock:
                    self.current = moved_to
                continue
            self._resolve()
            time.sleep(0.01)

    def _host_of(self, location: str) -> str | None:
        return next((h for h in self.hosts if location.startswith(f"{h}/")), None)

    def close(self) -> None:
        self._client.close()


class KvEndpoint(Protocol):
    """Where the load sends its requests: the VM's stable HTTP endpoint, or a guest's cvm-io in a test."""

    def kv(self, op: str, key: str, value: str = "") -> dict[str, Any]: ...


def load_key(client: int, i: int, keys_per_client: int) -> str:
    """The key of client ``client``'s ``i``-th write: its own keys, round-robin."""
    return f"c{client}-{i % keys_per_client}"


@dataclass
class Load:
    """Client threads overwriting their own bounded key sets (and reading some back) through the endpoint.

    ``acked`` holds the latest acknowledged value of every key; a write that got no answer leaves its key
    uncertain (it may or may not be stored) until a later write to it is acknowledged. ``max_requests``
    bounds a run by count as well as by ``stop``.
    """

    endpoint: KvEndpoint
    clients: int
    seed: int
    keys_per_client: int = KEYS_PER_CLIENT
    max_requests: int | None = None
    acked: dict[str, str] = field(default_factory=dict)
    acked_writes: int = 0
    requests: int = 0
    failed: int = 0
    full: int = 0
    wrong_reads: int = 0
    # (start, end) of every request, monotonic: the stall a migration caused is read from those that overlap it.
    spans: list[tuple[float, float]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _progress: threading.Condition = field(init=False)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._progress = threading.Condition(self._lock)

    def _count(self, t0: float, t1: float, *, failed: bool = False) -> bool:
        """Record one request (lock held); False once the run's request bound is reached."""
        self.requests += 1
        self.spans.append((t0, t1))
        self.failed += failed
        self._progress.notify_all()
        return self.max_requests is None or self.requests < self.max_requests

    def _run(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        i = 0
        while not self.stop.is_set():
            key = load_key(index, i, self.keys_per_client)
            value = rng.randbytes(12).hex()
            t0 = time.monotonic()
            try:
                status = self.endpoint.kv("put", key, value).get("status")
            except CvmError:
                status = None
            t1 = time.monotonic()
            with self._lock:
                if status == "OK":
                    self.acked[key] = value
                    self.acked_writes += 1
                else:
                    self.acked.pop(key, None)  # unanswered: stored or not, nobody can say
                    self.full += status == "FULL"
                if not self._count(t0, t1, failed=status != "OK"):
                    self.stop.set()
            if i % 4 == 3 and not self.stop.is_set():
                self._read_back(load_key(index, rng.randrange(i), self.keys_per_client))
            i += 1

    def _read_back(self, key: str) -> None:
        with self._lock:
            expected = self.acked.get(key)
        if expected is None:
            return
        t0 = time.monotonic()
        try:
            result: dict[str, Any] | None = self.endpoint.kv("get", key)
        except CvmError:
            result = None
        t1 = time.monotonic()
        with self._lock:
            if result is not None and result.get("value") != expected:
                self.wrong_reads += 1
            if not self._count(t0, t1, failed=result is None):
                self.stop.set()

    def wait_requests(self, count: int, timeout: float) -> bool:
        """Until ``count`` requests in all have completed (bounded by ``timeout``); False on timeout."""
        with self._progress:
            return self._progress.wait_for(lambda: self.requests >= count, timeout)

    def longest_wait(self, start: float = float("-inf"), end: float = float("inf")) -> float:
        """The longest request that was in flight at some point between ``start`` and ``end`` (default: any)."""
        with self._lock:
            return max((b - a for a, b in self.spans if b >= start and a <= end), default=0.0)

    def start(self) -> None:
        for i in range(self.clients):
            t = threading.Thread(target=self._run, args=(i,), name=f"client-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def finish(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(30)


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, flush=True)


def _wait(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise UsageError(f"timed out waiting for {what}")


def _demo(args: argparse.Namespace) -> int:

    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return _run(args, args.workdir)
    with tempfile.TemporaryDirectory(prefix="cvmotion-demo-") as tmp:
        return _run(args, Path(tmp))


def _attestation(host: str) -> dict[str, Any] | None:
    try:
        att = api("GET", f"{host}/v1/vms/{VM}/attestation", timeout=10)
    except CvmError:
        return None
    return att if att.get("token") else None


def _run(args: argparse.Namespace, root: Path) -> int:
    from cvmotion.cli.migrate import start, wait
    from cvmotion.host.fabric import LocalFabric

    quiet = args.json
    t_start = time.monotonic()
    with LocalFabric(root) as fabric, contextlib.ExitStack() as stack:
        portal = (
            stack.enter_context(_Portal(root / "controller", args.portal_listen, fabric.env)) if args.serve else None
        )
        _say(quiet, "cvmotion demo — the secure processor, KDS and chips are EMULATED (formats byte-exact AMD);")
        _say(quiet, "the VMs, TCP/TLS, X.509, signatures, AES-GCM and JWTs are real.\n")
        _say(quiet, "starting: emulated KDS, attestation service, key-release service ...")
        fabric.start_services(key_name=KEY_NAME)
        _say(quiet, "starting: host-a and host-b (host daemon + platform process each) ...")
        extra = portal.host_args() if portal is not None else []
        a = fabric.start_host("host-a", extra=extra)
        b = fabric.start_host("host-b", extra=extra)
        for h in (a, b):
            chip = f"{h.info['product']} {str(h.info['chip_id'])[:16]}..."
            _say(quiet, f"  {h.name}: {h.url}  chip {chip}  TCB {h.info['reported_tcb']}")
        _say(quiet, f"launching CVM {VM!r} (kvstore, {args.memory}) on host-a ...")
        vm = api(
            "POST",
            f"{a.url}/v1/vms",
            {"name": VM, "image": "kvstore", "memory": args.memory, "key_name": KEY_NAME},
            timeout=180,
        )
        _say(quiet, f"  running on {vm['backend']}; launch measurement {vm['measurement'][:32]}...")
        before = _wait("the paravisor's first token", lambda: _attestation(a.url), 60)
        token, chip = before["jti"][:12], before["chip_id"][:16]
        _say(quiet, f"  paravisor attested: token {token}... chip {chip}... data key {before['data_key']}")

        capacity = api("POST", f"{a.url}/v1/vms/{VM}/kv", {"op": "stats"})
        if args.clients * args.keys_per_client > capacity["slots"] // 2:
            raise UsageError(
                f"{args.clients} clients x {args.keys_per_client} keys would fill more than half of the "
                f"guest's {capacity['slots']}-slot table: use fewer keys or more --memory"
            )
        endpoint = Endpoint([a.url, b.url], VM)
        load = Load(endpoint, args.clients, args.seed, keys_per_client=args.keys_per_client)
        load.start()
        # The load runs for --load-seconds, and at least until every client has been answered a few times.
        time.sleep(args.load_seconds)
        if not load.wait_requests(4 * args.clients, 60):
            raise UsageError("the client load got no answers from the VM within 60 s")
        _say(quiet, f"client load running ({args.clients} clients, {load.requests} requests so far)")
        _say(quiet, "live-migrating host-a -> host-b ...")
        t_request = time.monotonic()
        mig_id = start(a.url, VM, b.url, downtime_limit_ms=args.downtime_limit, streams=args.streams)
        t_started = time.monotonic()
        info = wait(a.url, mig_id, 600)
        # Keep the load going until the clients have been answered a few more times (on the destination,
        # once the migration completed): counted, so it means the same on a fast and a slow machine.
        load.wait_requests(load.requests + 8 * args.clients, 30)
        load.finish()
        stall = load.longest_wait(t_request, time.monotonic())
        endpoint.close()
        after = None
        if info["status"] == "completed":
            after = _wait(
                "the post-migration token",
                lambda: (att := _attestation(b.url)) and att["chip_id"] != before["chip_id"] and att,
                30,
            )
        lost = _check_writes([a.url, b.url], load.acked)
        events = api("GET", f"{b.url}/v1/events?limit=500")["events"]
        post = [e["data"] for e in events if e["type"] == "cvmotion.PostMigrationAttestation"]
        x = info.get("x-cvmotion", {})
        summary = {
            "status": info["status"],
            "downtime_ms": x.get("downtime-ms", info.get("downtime")),
            "total_time_ms": x.get("total-time-ms", info.get("total-time")),
            "setup_time_ms": info.get("setup-time"),
            "rounds": len(x.get("rounds", [])),
            "transferred_bytes": info["ram"]["transferred"],
            "pages_normal": info["ram"]["normal"],
            "pages_zero": info["ram"]["duplicate"],
            "lost_writes": lost,
            "acknowledged_writes": load.acked_writes,
            "keys_written": len(load.acked),
            "kv_table_slots": capacity["slots"],
            "full_answers": load.full,
            "client_requests": load.requests,
            "failed_requests": load.failed,
            "wrong_reads": load.wrong_reads,
            # The longest request in flight while the migration ran (from the migrate call until the load
            # stopped on the destination); the longest of the whole run, warm-up included, beside it.
            "max_client_stall_ms": round(stall * 1000, 1),
            "max_client_latency_ms": round(load.longest_wait() * 1000, 1),
            # The migrate call returns once the destination has its VM process and import context ready;
            # QEMU's total-time likewise starts after its destination process is up.
            "destination_prepare_ms": round((t_started - t_request) * 1000, 1),
            "source_chip_id": a.info["chip_id"],
            "destination_chip_id": b.info["chip_id"],
            "source_tcb": a.info["reported_tcb"],
            "destination_tcb": b.info["reported_tcb"],
            "attestation_of_peer": x.get("attestation", {}),
            "token_before": {k: before.get(k) for k in _TOKEN_FIELDS},
            "token_after": {k: after.get(k) for k in ("jti", "chip_id", "tcb", "platform", "data_key")}
            if after
            else None,
            "post_migration_attestation": post[-1] if post else None,
            "destination_report": _report_claims(after["token"]) if after else None,
            "platform": "emulated",
            "error": info.get("error-desc"),
            "wall_seconds": round(time.monotonic() - t_start, 1),
        }
        ok = summary["status"] == "completed" and lost == 0 and load.failed == 0 and load.wrong_reads == 0
        if portal is not None:
            _report(args, summary)
            portal.seed_vm(quiet)
            portal.keep_running()
            return 0 if ok else 3
    _report(args, summary)
    _say(
        quiet,
        f"\nportal: 'cvmotion demo --serve' keeps this fabric running under a controller; browse http://{args.portal_listen}/",
    )
    return 0 if ok else 3


def _report(args: argparse.Namespace, summary: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(summary, indent=2), flush=True)
    else:
        _print_summary(summary)


class _Portal:
    """``demo --serve``: a fleet controller (serving the web portal) the demo's hosts register with."""

    def __init__(self, data_dir: Path, listen: str, env: dict[str, str]) -> None:
        self.data_dir, self.listen, self.env = data_dir, listen, env
        self.url = f"http://{listen}"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> _Portal:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "cvmotion", "controller", "serve", "--listen", self.listen]
        with (self.data_dir / "serve.log").open("wb") as log:
            # Its own session, like the fabric's processes: Ctrl-C reaches the demo, which stops it in order.
            self.proc = subprocess.Popen(
                [*cmd, "--data-dir", str(self.data_dir)],
                stdout=subprocess.PIPE, stderr=log, env=self.env, start_new_session=True,
            )  # fmt: skip
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            line = self.proc.stdout.readline().decode(errors="replace") if sel.select(60) else ""
        if not line.startswith("cvmotion controller: "):
            self.__exit__()
            raise UsageError(f"the controller did not start on {self.listen} (see {self.data_dir / 'serve.log'})")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    @property
    def owner(self) -> str:
        return (self.data_dir / "owner.token").read_text().strip()

    def host_args(self) -> list[str]:
        made = subprocess.run(
            [sys.executable, "-m", "cvmotion", "controller", "token", "create", "--data-dir", str(self.data_dir),
             "--role", "Host", "--json"],
            env=self.env, capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        return ["--controller", self.url, "--controller-token", json.loads(made.stdout)["token"]]

    def seed_vm(self, quiet: bool) -> None:
        """A VM created and moved through the controller, so the portal has one to show."""
        path = "/subscriptions/default/resourceGroups/demo/providers/Microsoft.Compute/virtualMachines/portal-demo"
        head = {"Authorization": f"Bearer {self.owner}"}
        props = {
            "hardwareProfile": {"vmSize": "Standard_DC2as_v5"},
            "storageProfile": {"imageReference": {"id": "kvstore"}},
            "securityProfile": {"confidentialLiveMigration": "Enabled"},
        }
        _say(quiet, "creating VM 'portal-demo' through the controller and moving it once ...")
        try:
            for method, suffix, body in (("PUT", "", {"properties": props}), ("POST", "/migrate", {})):
                answer = httpx.request(method, self.url + path + suffix, json=body, headers=head, timeout=60)
                answer.raise_for_status()
                operation = answer.headers["Azure-AsyncOperation"]
                _wait(f"{method} {suffix or 'create'}", lambda o=operation: _settled(o, head), 300)
        except (httpx.HTTPError, UsageError) as exc:
            _say(quiet, f"  (not done: {exc}; the portal still shows the hosts and events)")

    def keep_running(self) -> None:
        print(f"\nportal: {self.url}/  (sign in with the Owner token: {self.owner})", flush=True)
        print("the fabric keeps running; Ctrl-C stops it", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            while self.proc is not None and self.proc.poll() is None:
                time.sleep(1.0)
        except KeyboardInterrupt:
            pass
        # Stopping takes a few seconds: a second Ctrl-C must not leave half the fabric running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("stopping the fabric ...", flush=True)


def _settled(operation: str, head: dict[str, str]) -> bool:
    status = str(httpx.get(operation, headers=head, timeout=30).json().get("status"))
    if status == "Failed":
        raise UsageError(f"operation {operation} failed")
    return status == "Succeeded"


def _check_writes(hosts: list[str], acked: dict[str, str]) -> int:
    """Read back every key's latest acknowledged value from whichever host runs the VM; count the missing or wrong."""
    endpoint = Endpoint(hosts, VM, retry_for=10)
    lost = 0
    try:
        for key, value in acked.items():
            try:
                if endpoint.kv("get", key).get("value") != value:
                    lost += 1
            except CvmError:
                lost += 1
    finally:
        endpoint.close()
    return lost


def _report_claims(token: str) -> dict[str, Any]:
    from cvmotion.attestation.token import decode_unverified

    _, claims = decode_unverified(token)
    keep = (
        "x-ms-sevsnpvm-chipid",
        "x-ms-sevsnpvm-reportedtcb",
        "x-ms-sevsnpvm-bootloader-svn",
        "x-ms-sevsnpvm-snpfw-svn",
        "x-ms-sevsnpvm-microcode-svn",
        "x-ms-sevsnpvm-launchmeasurement",
        "x-ms-sevsnpvm-hostdata",
        "x-ms-sevsnpvm-is-debuggable",
        "x-ms-compliance-status",
        "x-cvmotion-platform",
        "iat",
        "exp",
        "jti",
    )
    return {k: claims[k] for k in keep if k in claims}


def _print_summary(s: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"live migration of {VM!r}: {s['status']}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    peer = s["attestation_of_peer"].get("peer", {})
    checks = len(s["attestation_of_peer"].get("policy_checks", []))
    before, after = s["token_before"] or {}, s["token_after"] or {}
    verified = "-"
    if peer:
        verified = (
            f"{peer.get('platform')} {peer.get('product')} chip {str(peer.get('chip_id'))[:16]}..., "
            f"pool {peer.get('pool')}, MA {str(peer.get('ma_measurement'))[:16]}...; {checks} policy checks passed"
        )
    mib = s["transferred_bytes"] / 2**20
    rows = [
        ("source (host-a)", f"chip {s['source_chip_id'][:24]}...  TCB {s['source_tcb']}"),
        ("destination (host-b)", f"chip {s['destination_chip_id'][:24]}...  TCB {s['destination_tcb']}"),
        ("destination as verified by the source MA", verified),
        ("destination prepared", f"{s['destination_prepare_ms']} ms (VM process + import context, before the clock)"),
        ("rounds", str(s["rounds"])),
        ("total time", f"{s['total_time_ms']} ms (setup {s['setup_time_ms']} ms: RA-TLS between the agents)"),
        ("downtime", f"{s['downtime_ms']} ms"),
        ("transferred", f"{mib:.1f} MiB ({s['pages_normal']} pages + {s['pages_zero']} zero pages as flags)"),
        ("client requests", f"{s['client_requests']} ({s['failed_requests']} failed)"),
        ("longest client stall", f"{s['max_client_stall_ms']} ms during the migration"),
        (
            "acknowledged writes",
            f"{s['acknowledged_writes']} to {s['keys_written']} keys (table: {s['kv_table_slots']} slots), "
            f"lost: {s['lost_writes']}",
        ),
        ("token before", f"{before.get('jti', '-')}  chip {str(before.get('chip_id', ''))[:16]}..."),
        ("token after", f"{after.get('jti', '-')}  chip {str(after.get('chip_id', ''))[:16]}..."),
        ("data key (fingerprint)", f"{before.get('data_key')} -> {after.get('data_key')}"),
    ]
    post = s.get("post_migration_attestation")
    if post:
        rows.append(
            (
                "re-attested after resume",
                f"{post.get('latency_ms')} ms; old token valid until exp {post.get('old_token_expires')}",
            )
        )
    report = s.get("destination_report") or {}
    if report:
        rows.append(
            (
                "destination SP report",
                f"chip {str(report.get('x-ms-sevsnpvm-chipid', ''))[:24]}..., snp svn "
                f"{report.get('x-ms-sevsnpvm-snpfw-svn')}, platform {report.get('x-cvmotion-platform')}",
            )
        )
    if s.get("error"):
        rows.append(("error", str(s["error"])))
    for what, value in rows:
        table.add_row(what, value)
    console.print(table)
    print(f"(whole demo: {s['wall_seconds']} s)")
