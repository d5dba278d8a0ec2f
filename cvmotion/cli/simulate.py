"""cli layer: ``cvmotion simulate`` — a maintenance wave over a simulated fleet, driven by the real controller."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cvmotion.errors import UsageError

__all__ = ["register"]

MAX_HOSTS = 5000
MAX_VMS = 100_000
# The scenario's VMs average ~7.2 vCPUs on hosts of 128: above ~10 VMs a host the fleet has no room to drain.
MAX_VMS_PER_HOST = 11


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sim = subparsers.add_parser(
        "simulate",
        help="a maintenance wave over simulated hosts, driven by the real controller and database",
        description=(
            "Runs the real fleet controller (its own process, real database and API) against simulated hosts "
            "that serve the host API in this process, creates the VMs through the controller, then updates every "
            "host, fault domain by fault domain, with hosts failing during the wave. Host-side durations are "
            "drawn from distributions measured on this machine and run --speed times faster than real time; "
            "the controller runs at its real pace. The invariants come from the hosts' own ground truth."
        ),
    )
    sim.add_argument("--hosts", type=int, default=1000, help=f"simulated hosts (2..{MAX_HOSTS}; default 1000)")
    sim.add_argument("--vms", type=int, default=10000, help="VMs created through the controller (default 10000)")
    sim.add_argument("--db", help="controller database URL (default: SQLite in a temporary directory)")
    sim.add_argument("--seed", type=int, default=1, help="seed of the scenario and of every draw (default 1)")
    sim.add_argument("--speed", type=float, default=60.0, help="virtual seconds per wall second (default 60)")
    sim.add_argument("--per-host", type=int, default=2, help="live migrations in flight per host (default 2)")
    sim.add_argument(
        "--workers", type=int, default=8, help="the controller's operation workers (default 8, as controller serve)"
    )
    sim.add_argument("--failures", type=int, default=-1, help="hosts that fail during the wave (default hosts/100)")
    sim.add_argument(
        "--driver",
        choices=("auto", "migrate"),
        default="auto",
        help="auto: drain each host through the controller's drain API when it serves one; migrate: move each VM"
        " through the per-VM migrate API and update the host in place (the operator's part played by the wave)",
    )
    sim.add_argument(
        "--notice",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="each Scheduled Event's NotBefore in simulated seconds (default 300; the controller gets it / --speed)",
    )
    sim.add_argument(
        "--per-call-tls",
        action="store_true",
        help="let the controller build a TLS context for every host call, as it does today (slow: see docs)",
    )
    sim.add_argument(
        "--data-dir", type=Path, help="keep the controller's database and logs here (default: a temporary directory)"
    )
    sim.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    sim.add_argument("--plot", type=Path, metavar="FILE.png", help="write the plot (PNG) here")
    sim.set_defaults(handler=_simulate)


def _check(args: argparse.Namespace) -> None:
    from cvmotion.control.db import database_url

    if not 2 <= args.hosts <= MAX_HOSTS:
        raise UsageError(f"--hosts {args.hosts}: give 2 to {MAX_HOSTS} hosts (a wave needs somewhere to move VMs)")
    if not 1 <= args.vms <= MAX_VMS:
        raise UsageError(f"--vms {args.vms}: give 1 to {MAX_VMS} VMs")
    if args.vms > args.hosts * MAX_VMS_PER_HOST:
        raise UsageError(
            f"--vms {args.vms} on {args.hosts} hosts: at most {args.hosts * MAX_VMS_PER_HOST} fit with room to drain"
        )
    if not 0 < args.speed <= 10_000:
        raise UsageError(f"--speed {args.speed}: give a factor above 0 and at most 10000")
    if not 1 <= args.per_host <= 16:
        raise UsageError(f"--per-host {args.per_host}: give 1 to 16")
    if not 1 <= args.workers <= 64:
        raise UsageError(f"--workers {args.workers}: give 1 to 64")
    if not 0 <= args.notice <= 7 * 86400:
        raise UsageError(f"--notice {args.notice}: give 0 to 604800 seconds")
    if args.failures > args.hosts // 2:
        raise UsageError(f"--failures {args.failures}: at most half the hosts ({args.hosts // 2})")
    if args.db is not None:
        database_url(args.db, Path("."))  # a clear error for a URL it cannot use, before anything starts
    if args.data_dir is not None and args.data_dir.exists() and any(args.data_dir.iterdir()):
        raise UsageError(f"--data-dir {args.data_dir}: give a new or empty directory")
    if args.plot is not None:
        if args.plot.suffix.lower() != ".png":
            raise UsageError(f"--plot {args.plot}: the plot is a PNG; name it FILE.png")
        if not args.plot.resolve().parent.is_dir():
            raise UsageError(f"--plot {args.plot}: directory {args.plot.resolve().parent} does not exist")


def _simulate(args: argparse.Namespace) -> int:
    _check(args)
    import signal

    # SIGTERM (kill, a CI timeout) runs the finally blocks that stop the controller process, as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    from cvmotion.sim.plot import write_plot
    from cvmotion.sim.report import render_table, summarise
    from cvmotion.sim.run import SimConfig, simulate

    config = SimConfig(
        hosts=args.hosts,
        vms=args.vms,
        seed=args.seed,
        db=args.db,
        speed=args.speed,
        per_host=args.per_host,
        workers=args.workers,
        failures=args.failures,
        shared_tls=not args.per_call_tls,
        data_dir=args.data_dir,
        driver=args.driver,
        notice_virtual_s=args.notice,
    )
    quiet = args.json
    outcome = simulate(config, progress=None if quiet else lambda text: print(f"simulate: {text}", file=sys.stderr))
    summary = summarise(outcome)
    if args.plot is not None:
        write_plot(outcome, summary, args.plot)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        from rich.console import Console

        Console().print(render_table(summary))
        if args.plot is not None:
            print(f"plot: {args.plot}")
    broken = summary["invariants"]
    return 0 if not (broken["policy_violations"] or broken["vms_on_two_hosts"] or broken["vms_lost"]) else 3
