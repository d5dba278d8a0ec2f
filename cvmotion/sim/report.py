"""sim layer: the simulation's figures — one dictionary (``--json``) and a table (rich).

Counts, blackouts and the three invariants come from the ground truth the simulated hosts kept
(``Ledger``); wave times from the driver; controller CPU and database statements from the controller
process's own counters, sampled just before and just after the wave.
"""

from __future__ import annotations

import os
import platform
import sys
from collections import Counter
from typing import Any

from cvmotion.sim.ledger import Method
from cvmotion.sim.run import SimOutcome

__all__ = ["percentile", "render_table", "summarise"]


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def _machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "")
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def _ms(value: float | None) -> float | None:
    return round(value, 1) if value is not None else None


def summarise(outcome: SimOutcome) -> dict[str, Any]:
    cfg, wave, verdict = outcome.config, outcome.wave, outcome.verdict
    ledger = outcome.fleet.ledger
    moves = Counter(method for _, method in ledger.moves)
    dark = [b.ms for b in ledger.blackouts]
    by_method = {
        m: [b.ms for b in ledger.blackouts if b.method is m] for m in (Method.LIVE, Method.INPLACE, Method.REDEPLOY)
    }
    steps = [s for h in wave.hosts for s in h.steps]
    live = sum(1 for s in steps if s.method == "LiveMigration" and s.outcome == "Succeeded")
    cpu = outcome.counters_after.cpu_s - outcome.counters_before.cpu_s
    statements = outcome.counters_after.statements - outcome.counters_before.statements
    commits = outcome.counters_after.commits - outcome.counters_before.commits
    wall = max(wave.ended - wave.started, 1e-9)
    return {
        "machine": _machine(),
        "config": {
            "hosts": cfg.hosts,
            "vms": cfg.vms,
            "seed": cfg.seed,
            "database": outcome.dialect,
            "speed": cfg.speed,
            "per_host_parallel": cfg.per_host,
            "controller_workers": cfg.workers,
            "fault_domains": len(outcome.scenario.fault_domains),
            "wave_driver": wave.mode,
            "controller_shared_tls_context": cfg.shared_tls,
        },  # fmt: skip
        "setup": {
            "vms_created": outcome.populated.created,
            "vms_failed": len(outcome.populated.failed),
            "seconds": round(outcome.populated.seconds, 1),
        },
        "wave": {
            "wall_s": round(wall, 1),
            "virtual_s": round(wave.virtual_ended - wave.virtual_started, 1),
            "hosts": len(wave.hosts),
            "hosts_by_status": dict(Counter(h.status for h in wave.hosts)),
            "host_failures_injected": len(wave.failed_hosts),
            "domains": [
                {"domain": d, "reason": r, "start_s": round(a, 1), "end_s": round(b, 1)} for d, a, b, r in wave.domains
            ],
        },
        "moves": {
            "live": moves[Method.LIVE],
            "in_place": moves[Method.INPLACE],
            "redeploy": moves[Method.REDEPLOY],
            "live_refused_by_controller": sum(1 for s in steps if s.outcome == "Blocked"),
            "live_failed": sum(1 for s in steps if s.outcome == "Failed"),
        },
        "blackout_ms": {
            "count": len(dark),
            "p50": _ms(percentile(dark, 50)),
            "p99": _ms(percentile(dark, 99)),
            "max": _ms(max(dark) if dark else None),
            **{
                f"{m.value}_p50_p99": [_ms(percentile(v, 50)), _ms(percentile(v, 99))]
                for m, v in by_method.items()
                if v
            },
        },
        "invariants": {
            "policy_violations": verdict.policy_violations,
            "vms_on_two_hosts": verdict.two_copies,
            "vms_lost": len(verdict.lost),
            "examples": [f"{v.kind}: {v.vm} on {v.host}: {v.detail}" for v in verdict.violations[:5]]
            + [f"lost: {name}" for name in verdict.lost[:5]],
        },
        "controller": {
            "cpu_s_in_wave": round(cpu, 2),
            "vm_steps": len(steps),
            "cpu_ms_per_vm_step": round(1000 * cpu / len(steps), 1) if steps else None,
            "cpu_ms_per_live_migration": round(1000 * cpu / live, 1) if live else None,
            "cpu_share_of_one_core": round(cpu / wall, 2),
            "db_statements_per_s": round(statements / wall, 1),
            "db_commits_per_s": round(commits / wall, 1),
            "heartbeats": outcome.heartbeats,
        },
        "simulator_event_errors": outcome.event_errors[:5],
    }


def render_table(summary: dict[str, Any]) -> Any:
    """A rich ``Table`` of the figures that matter, with the invariants first among the results."""
    from rich.table import Table

    cfg, wave, moves = summary["config"], summary["wave"], summary["moves"]
    inv, dark, ctl = summary["invariants"], summary["blackout_ms"], summary["controller"]
    table = Table(
        title=f"cvmotion simulate: {cfg['hosts']} hosts, {cfg['vms']} VMs ({cfg['database']}, seed {cfg['seed']})"
    )
    table.add_column("figure")
    table.add_column("value", justify="right")
    ok = wave["hosts_by_status"].get("Succeeded", 0)
    rows = [
        ("wave completion (wall)", f"{wave['wall_s']} s"),
        ("wave completion (virtual host time)", f"{wave['virtual_s']} s at {cfg['speed']}x"),
        ("hosts updated (Succeeded / other)", f"{ok} / {wave['hosts'] - ok}"),
        ("live migrations", str(moves["live"])),
        ("in-place updates (VM pauses)", str(moves["in_place"])),
        ("redeploys", str(moves["redeploy"])),
        ("live refused by controller / failed", f"{moves['live_refused_by_controller']} / {moves['live_failed']}"),
        ("blackout p50 / p99 / max", f"{dark['p50']} / {dark['p99']} / {dark['max']} ms"),
        ("policy violations", str(inv["policy_violations"])),
        ("VMs on two hosts", str(inv["vms_on_two_hosts"])),
        ("VMs lost", str(inv["vms_lost"])),
        ("controller CPU per VM handled", f"{ctl['cpu_ms_per_vm_step']} ms"),
        ("controller CPU per live migration", f"{ctl['cpu_ms_per_live_migration']} ms"),
        ("controller CPU (share of one core)", f"{ctl['cpu_s_in_wave']} s ({ctl['cpu_share_of_one_core']})"),
        ("database statements / commits per s", f"{ctl['db_statements_per_s']} / {ctl['db_commits_per_s']}"),
        ("host failures injected", str(wave["host_failures_injected"])),
        ("wave driver", cfg["wave_driver"]),
    ]  # fmt: skip
    for name, value in rows:
        table.add_row(name, value)
    return table
