"""sim layer: the simulation's plot (matplotlib, Agg backend: no display needed) as one PNG.

Three panels from the ground truth and the driver: completed moves over virtual time by method with the
fault domains' spans, the blackout distribution per method (log scale) with p50/p99, and hosts updated
over wall time; a text box holds the invariants.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cvmotion.sim.ledger import Method
from cvmotion.sim.report import percentile
from cvmotion.sim.run import SimOutcome

__all__ = ["write_plot"]

_COLOURS = {Method.LIVE: "tab:blue", Method.INPLACE: "tab:orange", Method.REDEPLOY: "tab:red"}


def write_plot(outcome: SimOutcome, summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ledger, wave = outcome.fleet.ledger, outcome.wave
    fig, axes = plt.subplots(1, 3, figsize=(16, 5), constrained_layout=True)
    timeline, dist, hosts = axes

    v0 = wave.virtual_started
    speed = outcome.config.speed
    for method in _COLOURS:
        times = sorted((t - v0) / 60.0 for t, m in ledger.moves if m is method and t >= v0)
        if times:
            timeline.step(times, range(1, len(times) + 1), where="post", color=_COLOURS[method], label=method.value)
    for i, (name, start, end, _reason) in enumerate(wave.domains):
        timeline.axvspan(start * speed / 60.0, end * speed / 60.0, color="grey", alpha=0.08 if i % 2 else 0.16)
        timeline.text(start * speed / 60.0, 0, name, fontsize=7, va="bottom")
    timeline.set_xlabel(f"virtual minutes (wall x {speed:g})")
    timeline.set_ylabel("completed")
    timeline.set_title("moves and in-place updates, by fault domain")
    timeline.legend(loc="upper left", fontsize=8)

    every = [b.ms for b in ledger.blackouts if b.ms > 0]
    # Log-spaced bins on the log axis, shared by the methods (equal-width bins turn into blocks there).
    bins = list(np.geomspace(min(every), max(every) * 1.01, 40)) if len(every) > 1 else 10
    for method, colour in _COLOURS.items():
        values = [b.ms for b in ledger.blackouts if b.method is method and b.ms > 0]
        if not values:
            continue
        dist.hist(values, bins=bins, alpha=0.6, color=colour, label=f"{method.value} (n={len(values)})")
        for q, style in ((50, "--"), (99, ":")):
            mark = percentile(values, q)
            if mark is not None:
                dist.axvline(mark, color=colour, linestyle=style, linewidth=1)
    dist.set_xscale("log")
    dist.set_xlabel("blackout, ms (dashed p50, dotted p99)")
    dist.set_ylabel("VMs")
    dist.set_title("blackout per VM (ground truth)")
    dist.legend(fontsize=8)

    ends = sorted(h.ended for h in wave.hosts)
    hosts.step(ends, range(1, len(ends) + 1), where="post", color="tab:green")
    hosts.set_xlabel("wall seconds since the wave started")
    hosts.set_ylabel("hosts updated")
    hosts.set_title("wave progress (wall time)")
    inv = summary["invariants"]
    ctl = summary["controller"]
    text = (
        f"policy violations: {inv['policy_violations']}\nVMs on two hosts: {inv['vms_on_two_hosts']}\n"
        f"VMs lost: {inv['vms_lost']}\ncontroller CPU/VM: {ctl['cpu_ms_per_vm_step']} ms\n"
        f"DB statements/s: {ctl['db_statements_per_s']}"
    )
    hosts.text(0.02, 0.98, text, transform=hosts.transAxes, va="top", fontsize=8, family="monospace",
               bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8})  # fmt: skip
    cfg = summary["config"]
    fig.suptitle(
        f"cvmotion simulate — {cfg['hosts']} hosts, {cfg['vms']} VMs, {cfg['database']},"
        f" wave {summary['wave']['wall_s']} s wall ({cfg['wave_driver']})"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
