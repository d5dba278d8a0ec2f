"""Benchmark: where pre-copy stops converging, and what auto-converge and the forced switchover do there.

A 1 GiB memdirty VM (2 MiB working set, nearly idle) carries the DMA load device (``vmm.devices.dma``): a
256 MiB window of guest memory (more than a round can carry within the downtime limit) rewritten at a
configured rate through the VMM's write path, which dirty tracking sees exactly as it sees guest writes. For
each rate the VM is migrated between two cvmotion hosts on loopback three times: with auto-converge (throttling
the vCPUs, which throttles the guest-driven DMA), without it, and without it but with ``force_switchover`` (after
``max_rounds`` the switchover happens even past the limit; by default such a migration fails before the start
token and the VM runs on at the source). The table gives rounds, total time, downtime against the limit, bytes
sent and how it ended (converged / throttled to N % / forced / not converged).

QEMU cannot be given the same load: it has no device that dirties guest memory at a set rate, and guest code
under this nested KVM writes only ~20,000 pages/s (≈80 MiB/s), far below where pre-copy stops converging, so
this table has no QEMU column; ``bench/migrate_vs_qemu.py`` compares the two on guest-driven loads.

    .venv/bin/python bench/convergence.py [--rates 0,100,250,500,1000,2000] [--limit 300] [--max-rounds 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cvmhosts import HostPair, exit_cleanly_on_sigterm, heartbeats  # noqa: E402
from _machine import machine_facts, wait_quiet  # noqa: E402

WINDOW_MIB = 256
MEMORY = "1G"
READY_TIMEOUT = 120.0


MODES = ((True, False), (False, False), (False, True))  # (auto-converge, force_switchover)


def run(pair: HostPair, rate: int, mode: tuple[bool, bool], limit: int, max_rounds: int, n: int) -> dict[str, Any]:
    auto_converge, force = mode
    name = f"conv-{rate}-{int(auto_converge)}{int(force)}-{n}"
    cmdline = f"dirty_mib=2 rate=1 hb_ms=100 dma_base=0x1000000 dma_mib={WINDOW_MIB} dma_rate={rate}"
    pair.create_vm(name, cmdline=cmdline, memory=MEMORY)
    try:
        pair.wait_console(pair.a, name, lambda lines: bool(heartbeats(lines)), READY_TIMEOUT)
        time.sleep(0.5)  # let the device fill its window once, so round 0 sees the steady state
        info = pair.migrate(
            name,
            downtime_limit_ms=limit,
            max_rounds=max_rounds,
            auto_converge=auto_converge,
            force_switchover=force,
            timeout=600,
        )
        x = info.get("x-cvmotion", {})
        ram = info.get("ram", {})
        throttle = max((int(r.get("throttle", 0)) for r in x.get("rounds", [])), default=0)
        forced = bool(x.get("forced-switchover"))
        how = "forced" if forced else (f"throttled {throttle} %" if throttle else "converged")
        if info["status"] != "completed":
            kind = x.get("error-kind")
            how = (
                "not converged: ran on at the source" if kind == "NotConverged" else f"failed: {info.get('error-desc')}"
            )
        return {
            "rate": rate,
            "auto_converge": auto_converge,
            "force_switchover": force,
            "status": info["status"],
            "rounds": int(ram.get("dirty-sync-count", 0)),
            "total_ms": float(x.get("total-time-ms", info.get("total-time", 0))),
            "downtime_ms": float(x.get("downtime-ms", info.get("downtime", 0))),
            "limit_ms": limit,
            "mib_sent": int(ram.get("transferred", 0)) / 2**20,
            "how": how,
        }
    finally:
        pair.delete(pair.b, name)
        pair.delete(pair.a, name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="0,100,250,500,1000,2000", help="DMA rates in MiB/s")
    parser.add_argument("--limit", type=int, default=300, help="downtime limit in ms")
    parser.add_argument("--max-rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    exit_cleanly_on_sigterm()
    console = Console(width=150)
    rates = [int(r) for r in args.rates.split(",")]
    load = wait_quiet(1.0, 120.0)
    facts = machine_facts({"load when started": f"{load:.2f}"})
    pair = HostPair.start()
    results: list[dict[str, Any]] = []
    try:
        for rate in rates:
            for mode in MODES:
                result = run(pair, rate, mode, args.limit, args.max_rounds, len(results))
                console.print(result)
                results.append(result)
    finally:
        pair.close()
    table = Table(title=f"pre-copy under DMA load ({WINDOW_MIB} MiB window, limit {args.limit} ms)")
    columns = ("DMA MiB/s", "auto-converge", "force", "rounds", "total ms", "downtime ms", "MiB sent", "ended")
    for column in columns:
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            str(r["rate"]),
            "on" if r["auto_converge"] else "off",
            "yes" if r["force_switchover"] else "no",
            str(r["rounds"]),
            f"{r['total_ms']:.0f}",
            f"{r['downtime_ms']:.1f}" if r["status"] == "completed" else "-",
            f"{r['mib_sent']:.0f}",
            r["how"],
        )
    console.print(table)
    console.print(f"machine: {facts}")
    if args.out:
        args.out.write_text(json.dumps({"machine": facts, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
