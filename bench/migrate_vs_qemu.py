"""Benchmark: cvmotion's confidential live migration against QEMU's own, side by side on one machine.

Same machine, same guest image (``build/guests/memdirty.elf``), same memory and working set, loopback:

* ``1g``: a 1 GiB VM running memdirty with a 256 MiB working set written as fast as it can (``dirty_mib=256
  rate=0``);
* ``8g``: a full-size Standard_DC2as_v5 (8 GiB) VM with the same 256 MiB working set;
* ``idle``: the same 8 GiB VM with 1 GiB populated, then nearly idle (``dirty_mib=1024 rate=1``: one write a
  second; its vCPU still spins on the TSC) — the stream's own pace, what a large, quiet guest moves at;
* each at QEMU's default downtime limit (300 ms) and at a tight one (``--tight-limit``, 50 ms by default).

cvmotion: two host daemons (``LocalFabric``: real processes, emulated AMD-SP, RA-TLS between the migration
agents, every page AES-256-GCM sealed), ``POST /v1/vms/NAME/migrate`` and its ``query-migrate``.  QEMU:
``qemu-system-x86_64 -enable-kvm`` source and ``-incoming defer`` destination, QMP ``migrate`` over
``tcp:127.0.0.1`` in plain TCP and TLS (``tls-creds-x509``, mutual), ``max-bandwidth`` lifted as libvirt does
(QEMU's own default caps migration at 128 MiB/s), the same ``downtime-limit``.  A run counts only if the
guest continues on the destination (its heartbeat sequence goes on; a restarted guest would start over).

    .venv/bin/python bench/migrate_vs_qemu.py [--scenario 1g|8g|all] [--repeat N] [--tight-limit MS]
        [--streams N] [--no-qemu] [--out DIR]

Prints one table per scenario (median of ``--repeat`` runs) and writes every run's ``query-migrate`` to
``DIR/migrate_vs_qemu.json``.  Without QEMU installed it says how to install it and runs cvmotion alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cvmhosts import HostPair, cpu_seconds, exit_cleanly_on_sigterm, heartbeats  # noqa: E402
from _machine import machine_facts, wait_quiet  # noqa: E402
from _qemu import INSTALL_HINT, QemuPair, QmpError, free_port, qemu_binary, qemu_version  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
KERNEL = REPO / "build" / "guests" / "memdirty.elf"
WORKING_SET_MIB = 256


@dataclass(frozen=True)
class Scenario:
    title: str
    memory: str
    size: str | None = None  # an Azure size (the host API's ``size``) instead of a bare memory size
    cmdline: str = f"dirty_mib={WORKING_SET_MIB} rate=0"  # memdirty's, the same for both systems


SCENARIOS = {
    "1g": Scenario("1 GiB VM, memdirty 256 MiB working set at full speed", "1G"),
    "8g": Scenario(
        "Standard_DC2as_v5 (8 GiB) VM, memdirty 256 MiB working set at full speed", "8G", "Standard_DC2as_v5"
    ),
    "idle": Scenario(
        "Standard_DC2as_v5 (8 GiB) VM, 1 GiB populated then nearly idle (memdirty dirty_mib=1024 rate=1)",
        "8G",
        "Standard_DC2as_v5",
        "dirty_mib=1024 rate=1",
    ),
    # The same, but the guest halts between its writes (LAPIC TSC-deadline timer) instead of spinning on the TSC,
    # as an idle OS does: its vCPU stops taking one of the machine's cores from the migration, on both systems.
    "idle-halt": Scenario(
        "Standard_DC2as_v5 (8 GiB) VM, 1 GiB populated then idle, halted between writes (memdirty ... halt=1)",
        "8G",
        "Standard_DC2as_v5",
        "dirty_mib=1024 rate=1 halt=1",
    ),
}
# QEMU's default CPU model (qemu64) lacks the TSC-deadline timer the halting guest sleeps on; KVM provides it.
QEMU_CPU_FOR_HALT = ["-cpu", "qemu64,+tsc-deadline"]
UNLIMITED = 100 << 30  # bytes/s: QEMU's max-bandwidth lifted, as libvirt does
READY_TIMEOUT = 180.0
MIGRATE_TIMEOUT = 300.0


@dataclass
class Run:
    """One migration, in QEMU's units (ms, bytes)."""

    system: str
    limit_ms: int
    status: str
    total_ms: float
    downtime_ms: float
    setup_ms: float
    transferred: int
    rounds: int
    mbps: float
    continued: bool
    # Source stopped -> destination running, as the guest lives it.  QEMU: its STOP and RESUME events; cvmotion:
    # its downtime (pause -> the destination's "committed", sent after the vCPUs resumed: an upper bound).
    blackout_ms: float = float("nan")
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "completed" and self.continued


def _ready(lines: list[str]) -> bool:
    """memdirty touched its whole working set and is writing (two heartbeats after "ready")."""
    ready = [i for i, line in enumerate(lines) if line.startswith("memdirty: ready")]
    return bool(ready) and len(heartbeats(lines[ready[0] :])) >= 2


def run_cvmotion(pair: HostPair, scenario: str, n: int, limit: int, streams: int) -> Run:
    spec = SCENARIOS[scenario]
    name = f"bench-{scenario}-{limit}-{n}"
    pair.create_vm(
        name,
        cmdline=spec.cmdline,
        memory=None if spec.size else spec.memory,
        size=spec.size,
    )
    try:
        before = pair.wait_console(pair.a, name, _ready, READY_TIMEOUT)
        last_seq = max(seq for seq, _ in heartbeats(before))
        pids = pair.pids()
        vm_pid = pair.vm_pid(pair.a, name)
        if vm_pid is not None:
            pids["src-vm"] = vm_pid
        cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
        info = pair.migrate(name, downtime_limit_ms=limit, streams=streams, timeout=MIGRATE_TIMEOUT)
        cpu = {k: round(cpu_seconds(p) - cpu0[k], 3) for k, p in pids.items()}
        continued = False
        if info["status"] == "completed":
            after = pair.wait_console(
                pair.b, name, lambda lines: any(seq > last_seq for seq, _ in heartbeats(lines)), 30
            )
            continued = not any(line.startswith("memdirty: start") for line in after[-50:])
        x = info.get("x-cvmotion", {})
        ram = info.get("ram", {})
        # What the guest sees, as QEMU's STOP -> RESUME events: the source's pause to the destination's resume on
        # this one host clock (the reported downtime also waits for the destination's "committed" to come back).
        resumed, paused = pair.resumed_at(name), x.get("paused-at")
        blackout = (resumed - float(paused)) * 1000 if resumed is not None and paused is not None else float("nan")
        return Run(
            system="cvmotion",
            limit_ms=limit,
            status=str(info["status"]),
            total_ms=float(x.get("total-time-ms", info.get("total-time", 0))),
            downtime_ms=float(x.get("downtime-ms", info.get("downtime", 0))),
            setup_ms=float(info.get("setup-time", 0)),
            transferred=int(ram.get("transferred", 0)),
            rounds=int(ram.get("dirty-sync-count", 0)),
            mbps=float(ram.get("mbps", 0)),
            continued=continued,
            blackout_ms=blackout,
            extra={
                "query-migrate": info,
                "cpu_seconds": cpu,
                "error": info.get("error-desc"),
                "streams": streams,
            },
        )
    finally:
        pair.delete(pair.b, name)
        pair.delete(pair.a, name)


def run_qemu(scenario: str, limit: int, tls: bool) -> Run:
    spec = SCENARIOS[scenario]
    extra = QEMU_CPU_FOR_HALT if "halt=1" in spec.cmdline else None
    pair = QemuPair.start(kernel=KERNEL, append=spec.cmdline, memory=spec.memory, tls=tls, extra=extra)
    try:
        before = pair.wait_serial(pair.src, _ready, READY_TIMEOUT)
        last_seq = max(seq for seq, _ in heartbeats(before))
        cpu0 = {"src-qemu": cpu_seconds(pair.src.proc.pid), "dst-qemu": cpu_seconds(pair.dst.proc.pid)}
        info = pair.migrate(
            port=free_port(), tls=tls, downtime_limit_ms=limit, max_bandwidth=UNLIMITED, timeout=MIGRATE_TIMEOUT
        )
        cpu = {
            "src-qemu": round(cpu_seconds(pair.src.proc.pid) - cpu0["src-qemu"], 3),
            "dst-qemu": round(cpu_seconds(pair.dst.proc.pid) - cpu0["dst-qemu"], 3),
        }
        continued = False
        if info.get("status") == "completed":
            after = pair.wait_serial(pair.dst, lambda lines: any(s > last_seq for s, _ in heartbeats(lines)), 30)
            continued = not any(line.startswith("memdirty: start") for line in after)
        ram = info.get("ram", {})
        return Run(
            system="qemu-tls" if tls else "qemu-tcp",
            limit_ms=limit,
            status=str(info.get("status")),
            total_ms=float(info.get("total-time", 0)),
            downtime_ms=float(info.get("downtime", 0)),
            setup_ms=float(info.get("setup-time", 0)),
            transferred=int(ram.get("transferred", 0)),
            rounds=int(ram.get("dirty-sync-count", 0)),
            mbps=float(ram.get("mbps", 0)),
            continued=continued,
            blackout_ms=float(info.get("x-blackout-ms", float("nan"))),
            extra={"query-migrate": info, "cpu_seconds": cpu, "error": info.get("error-desc")},
        )
    finally:
        pair.close()


def _median(runs: list[Run], get: Callable[[Run], float]) -> float:
    values = [get(r) for r in runs if r.ok]
    return statistics.median(values) if values else float("nan")


def _cell(runs: list[Run], get: Callable[[Run], float], fmt: str) -> str:
    ok = [r for r in runs if r.ok]
    if not ok:
        return "[red]failed[/red]"
    values = [get(r) for r in ok]
    text = fmt.format(statistics.median(values))
    if len(values) > 1:
        text += f" [dim]({fmt.format(min(values))}–{fmt.format(max(values))})[/dim]"
    return text


def table(scenario: str, results: dict[str, list[Run]], facts: dict[str, Any]) -> Table:
    spec = SCENARIOS[scenario]
    t = Table(title=f"{spec.title} — median of {max(len(v) for v in results.values())} run(s)")
    t.add_column("metric", style="bold")
    columns = list(results)
    for key in columns:
        system, limit = key.rsplit("@", 1)
        t.add_column(f"{system}\ndowntime-limit {limit} ms", justify="right")
    rows: list[tuple[str, Callable[[Run], float], str]] = [
        ("total-time (ms)", lambda r: r.total_ms, "{:.0f}"),
        ("downtime, as each reports it (ms)", lambda r: r.downtime_ms, "{:.0f}"),
        ("blackout: source stopped → destination running (ms)", lambda r: r.blackout_ms, "{:.1f}"),
        ("setup-time (ms)", lambda r: r.setup_ms, "{:.0f}"),
        ("transferred (MiB)", lambda r: r.transferred / (1 << 20), "{:.0f}"),
        ("rounds (dirty-sync-count)", lambda r: float(r.rounds), "{:.0f}"),
        ("throughput, transferred/total (MB/s)", lambda r: r.transferred / max(r.total_ms, 1) / 1e3, "{:.0f}"),
        ("ram.mbps (Mbit/s)", lambda r: r.mbps, "{:.0f}"),
    ]
    for label, get, fmt in rows:
        t.add_row(label, *(_cell(results[k], get, fmt) for k in columns))
    t.add_row("runs ok / total", *(f"{sum(r.ok for r in results[k])}/{len(results[k])}" for k in columns))
    # Issue 12's "never over the limit": counted by the blackout (what the guest lost) and by each tool's own
    # downtime figure, per run, not by the median.
    over = {
        k: (sum(r.blackout_ms > r.limit_ms for r in v), sum(r.downtime_ms > r.limit_ms for r in v))
        for k, v in results.items()
    }
    t.add_row("runs over the limit (blackout / own downtime)", *(f"{over[k][0]} / {over[k][1]}" for k in columns))
    t.add_row(
        "encrypted", *("AES-256-GCM per page" if "cvmotion" in k else ("TLS" if "tls" in k else "no") for k in columns)
    )
    t.caption = (
        f"{facts['cpu']}, {facts['cpus']} CPUs, {facts['memory_gib']} GiB, kernel {facts['kernel']} ({facts['kvm']}); "
        f"{facts['qemu']}; load {facts['loadavg']}"
    )
    return t


def main() -> int:
    exit_cleanly_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=(*SCENARIOS, "all"), default="all")
    parser.add_argument("--no-tls", action="store_true", help="skip QEMU's TLS runs (plain TCP only)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration (median reported)")
    parser.add_argument("--tight-limit", type=int, default=50, help="the second downtime limit, ms (0: skip)")
    parser.add_argument("--streams", type=int, default=2, help="cvmotion TCP streams")
    parser.add_argument("--no-qemu", action="store_true", help="cvmotion only")
    parser.add_argument("--max-load", type=float, default=0.7, help="wait (bounded) for a 1-min load below this")
    parser.add_argument("--out", type=Path, default=REPO / "build" / "bench")
    args = parser.parse_args()
    console = Console(width=150)
    if not KERNEL.exists():
        console.print(f"[red]{KERNEL} is missing: run `make guests` first[/red]")
        return 1
    with_qemu = not args.no_qemu and qemu_binary() is not None
    if not args.no_qemu and not with_qemu:
        console.print(f"[yellow]qemu-system-x86_64 is not installed; running cvmotion only. Install: {INSTALL_HINT}")
    limits = [300] + ([args.tight_limit] if args.tight_limit else [])
    scenarios = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    facts = machine_facts({"qemu": qemu_version()})
    console.print(facts)
    report: dict[str, Any] = {"machine": facts, "args": vars(args) | {"out": str(args.out)}, "scenarios": {}}
    for scenario in scenarios:
        results: dict[str, list[Run]] = {}
        for limit in limits:
            results[f"cvmotion@{limit}"] = []
            if with_qemu:
                results[f"qemu-tcp@{limit}"] = []
                if not args.no_tls:
                    results[f"qemu-tls@{limit}"] = []
        pair = HostPair.start()
        try:
            for n in range(args.repeat):
                for limit in limits:
                    # Interleaved: every configuration sees the same machine conditions, round by round.
                    load = wait_quiet(args.max_load, 60)
                    run = run_cvmotion(pair, scenario, n, limit, args.streams)
                    run.extra["load"] = load
                    results[f"cvmotion@{limit}"].append(run)
                    _say(console, scenario, run)
                    if with_qemu:
                        for tls in (False,) if args.no_tls else (False, True):
                            load = wait_quiet(args.max_load, 60)
                            try:
                                run = run_qemu(scenario, limit, tls)
                            except (QmpError, TimeoutError, OSError) as exc:
                                run = Run(
                                    "qemu-tls" if tls else "qemu-tcp", limit, f"error: {exc}", 0, 0, 0, 0, 0, 0, False
                                )
                            run.extra["load"] = load
                            results[f"{run.system}@{limit}"].append(run)
                            _say(console, scenario, run)
        finally:
            pair.close()
        console.print(table(scenario, results, facts))
        report["scenarios"][scenario] = {
            "title": SCENARIOS[scenario].title,
            "median": {
                k: {
                    "total_ms": _median(v, lambda r: r.total_ms),
                    "downtime_ms": _median(v, lambda r: r.downtime_ms),
                    "blackout_ms": _median(v, lambda r: r.blackout_ms),
                    "setup_ms": _median(v, lambda r: r.setup_ms),
                    "transferred": _median(v, lambda r: float(r.transferred)),
                    "rounds": _median(v, lambda r: float(r.rounds)),
                }
                for k, v in results.items()
            },
            "runs": {k: [asdict(r) for r in v] for k, v in results.items()},
        }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "migrate_vs_qemu.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    console.print(f"results: {path}")
    return 0


def _say(console: Console, scenario: str, run: Run) -> None:
    mark = "[green]ok[/green]" if run.ok else f"[red]{run.status} {run.extra.get('error') or ''}[/red]"
    console.print(
        f"{time.strftime('%H:%M:%S')} {scenario} {run.system:9} limit {run.limit_ms:3} ms: total {run.total_ms:7.0f} ms"
        f"  downtime {run.downtime_ms:5.0f} ms  blackout {run.blackout_ms:6.1f} ms  rounds {run.rounds:2}"
        f"  {run.transferred / (1 << 20):6.0f} MiB  {mark}"
        f"  (load {run.extra.get('load', 0):.2f})"
    )


if __name__ == "__main__":
    raise SystemExit(main())
