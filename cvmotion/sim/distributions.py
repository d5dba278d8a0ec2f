"""sim layer: the durations simulated hosts draw — calibrated on what this machine measured.

Every parameter names where it was measured (the README's Performance section, 2-vCPU AMD EPYC KVM
guest under ``kvm_pvm``, Python 3.11; the scripts in ``bench/``):

* Live migration is modelled as the engine runs it (DESIGN §7): a setup (the RA-TLS session between the
  migration agents), round 0 sending the populated pages (``SEEK_DATA``: never the untouched ones), later
  rounds sending what was dirtied meanwhile (bounded by the VM's hot set), switchover once the rest fits the
  300 ms downtime limit or after 10 rounds (auto-converge throttling the vCPUs 20 %, then +10 % per round),
  and a downtime of a fixed switchover cost plus the final set at stream speed.  So the durations scale with
  the VM's populated memory and its dirty rate, with the stream speed drawn per migration.
* The in-place (memory-preserving) update's pause and a redeploy's gap: see their constants.

``tests/unit/sim/test_distributions.py`` holds the model to the measured runs it was calibrated on.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

__all__ = [
    "DOWNTIME_LIMIT_MS",
    "LiveMigration",
    "Workload",
    "draw_inplace_pause_ms",
    "draw_live_migration",
    "draw_redeploy_gap_ms",
]

# Stream speed end to end (sealed by the source SP, sent, opened into the destination's memory), MiB/s.
# bench/migrate_vs_qemu.py, 1 GiB VM with a 256 MiB working set: 284 MiB in a median 901 ms (747-1143)
# = ~315 MiB/s; bench/stream_throughput.py round 0: 0.270 GB/s (0.155-0.332); bench/convergence.py: ~0.56
# GB/s on a quiet machine.  Lognormal around the middle, clipped to the extremes seen.
STREAM_MIB_S_MEDIAN = 320.0
STREAM_SIGMA = 0.3
STREAM_MIB_S_RANGE = (150.0, 560.0)
# setup-time of the same runs: 52-73 ms (the agents' RA-TLS session alone is 25-29 ms, bench/agent_bench.py).
SETUP_MS_RANGE = (52.0, 73.0)
# Downtime of a VM with nothing left to send: 12.7-30.6 ms (bench/convergence.py at 0 MiB/s; 22-24 ms medians
# at a 50 ms limit in bench/migrate_vs_qemu.py): pause, state, start token through both SPs, resume.
SWITCHOVER_MS_RANGE = (12.0, 31.0)
DOWNTIME_LIMIT_MS = 300.0  # the engine's default (QEMU's)
MAX_ROUNDS = 10  # the engine's default before a forced switchover
THROTTLE_START, THROTTLE_STEP, THROTTLE_MAX = 0.20, 0.10, 0.99  # auto-converge, as the engine does it

# In-place (memory-preserving) update: vCPUs paused, host daemon and platform process restarted, VM resumed.
# Measured by bench/inplace_pause.py (16 MiB kvstore VMs on KVM, this 2-vCPU machine at load 10-12): one VM per
# host, 10 runs: median 132 ms, max 282 ms; two VMs, 5 runs: median 176 ms, max 326 ms (sealing the SP state
# ~50 ms, the new platform serving 80-115 ms, the daemon hand-over to resume ~80 ms).  Lognormal with median
# 150 ms and sigma 0.4 (the 10-run maximum sits near 2 sigma), clipped to 80-1000 ms.
INPLACE_PAUSE_MS_MEDIAN = 150.0
INPLACE_PAUSE_SIGMA = 0.4
INPLACE_PAUSE_MS_RANGE = (80.0, 1000.0)

# Redeploy: the VM stops, then is created and boots on another host.  Creating a VM measured 0.3 s (small)
# to 4 s (EC96as_v5, 672 GiB) here (README, VMM); linear in memory between the two, +-20 %.
REDEPLOY_MS_SMALL, REDEPLOY_MS_LARGEST, LARGEST_GIB = 300.0, 4000.0, 672


@dataclass(frozen=True, slots=True)
class Workload:
    """What the migration model needs of a VM: its memory and how its guest uses it."""

    memory_gib: float
    populated_gib: float  # pages the guest has touched: what round 0 sends
    hot_mib: float  # the set it keeps rewriting: the most a later round can find dirty
    dirty_mib_s: float  # how fast it dirties distinct pages of that set


@dataclass(frozen=True, slots=True)
class LiveMigration:
    total_ms: float
    downtime_ms: float
    setup_ms: float
    rounds: int
    transferred_mib: float
    forced: bool  # switched over at the round cap, not because the rest fitted the limit


def _lognormal(rng: random.Random, median: float, sigma: float, lo: float, hi: float) -> float:
    return min(hi, max(lo, median * math.exp(rng.gauss(0.0, sigma))))


def draw_stream_mib_s(rng: random.Random) -> float:
    return _lognormal(rng, STREAM_MIB_S_MEDIAN, STREAM_SIGMA, *STREAM_MIB_S_RANGE)


def precopy(work: Workload, bw_mib_s: float, setup_ms: float, switch_ms: float, limit_ms: float) -> LiveMigration:
    """The engine's pre-copy loop over a fluid model of the guest (deterministic given its inputs)."""
    to_send = work.populated_gib * 1024.0
    elapsed_ms, sent, throttle, rounds = setup_ms, 0.0, 0.0, 0
    while True:
        rounds += 1
        round_ms = to_send / bw_mib_s * 1000.0
        elapsed_ms += round_ms
        sent += to_send
        dirtied = min(work.hot_mib, work.dirty_mib_s * (1.0 - throttle) * round_ms / 1000.0)
        fits = dirtied / bw_mib_s * 1000.0 <= limit_ms
        if fits or rounds >= MAX_ROUNDS:
            downtime = switch_ms + dirtied / bw_mib_s * 1000.0
            return LiveMigration(
                total_ms=elapsed_ms + downtime,
                downtime_ms=downtime,
                setup_ms=setup_ms,
                rounds=rounds + 1,  # the final (stop-and-copy) round counts, as dirty-sync-count does
                transferred_mib=sent + dirtied,
                forced=not fits,
            )
        if dirtied > 0.9 * to_send:  # not shrinking: auto-converge throttles the vCPUs
            throttle = THROTTLE_START if throttle == 0.0 else min(THROTTLE_MAX, throttle + THROTTLE_STEP)
        to_send = dirtied


def draw_live_migration(rng: random.Random, work: Workload, limit_ms: float = DOWNTIME_LIMIT_MS) -> LiveMigration:
    return precopy(
        work,
        draw_stream_mib_s(rng),
        rng.uniform(*SETUP_MS_RANGE),
        rng.uniform(*SWITCHOVER_MS_RANGE),
        limit_ms,
    )


def draw_inplace_pause_ms(rng: random.Random) -> float:
    return _lognormal(rng, INPLACE_PAUSE_MS_MEDIAN, INPLACE_PAUSE_SIGMA, *INPLACE_PAUSE_MS_RANGE)


def draw_redeploy_gap_ms(rng: random.Random, memory_gib: float) -> float:
    share = min(1.0, max(0.0, memory_gib / LARGEST_GIB))
    return (REDEPLOY_MS_SMALL + (REDEPLOY_MS_LARGEST - REDEPLOY_MS_SMALL) * share) * rng.uniform(0.8, 1.2)
