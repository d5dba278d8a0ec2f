"""Where a live migration's blackout goes, step by step, across every process of both hosts.

Runs the idle scenario of ``bench/migrate_vs_qemu.py`` (or ``--scenario small``: a 64 MiB VM, for a quick look)
between two real hosts on loopback with ``CVMOTION_TRACE`` set, so that each process (daemons, platform/SP
processes, VM processes) writes its RPC calls, their queueing and serving, and the migration's phases on the one
host clock (``cvmotion.ipc.trace``). For each run it prints every span that overlaps the blackout — from the
source's pause to the destination's resume — in order, relative to the pause::

    .venv/bin/python bench/switchover_profile.py [--scenario idle|idle-halt|small|busy] [--repeat 3] [--limit 50]

Spans land in ``build/bench/switchover_profile/run-N/``; the table is the whole output (no figures are kept).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _cvmhosts import HostPair, exit_cleanly_on_sigterm, heartbeats  # noqa: E402

from cvmotion.ipc.trace import Span, parse  # noqa: E402

OUT = Path("build/bench/switchover_profile")
SCENARIOS = {
    "idle": ("Standard_DC2as_v5", None, "dirty_mib=1024 rate=1"),
    "idle-halt": ("Standard_DC2as_v5", None, "dirty_mib=1024 rate=1 halt=1"),
    "small": (None, "64M", "dirty_mib=16 rate=1"),
    "busy": (None, "1G", "dirty_mib=256 rate=0"),  # migrate_vs_qemu's 1g: a 256 MiB working set at full speed
}


def _ready(lines: list[str]) -> bool:
    ready = [i for i, line in enumerate(lines) if line.startswith("memdirty: ready")]
    return bool(ready) and len(heartbeats(lines[ready[0] :])) >= 2


def _window(spans: list[Span]) -> tuple[int, int] | None:
    # The source's switchover starts where its phases are counted from (the daemon's clock before the pause: the
    # engine's own "source paused", or, with the firmware's one-command switchover, the first phase it marks).
    paused = [s for s in spans if s.name in ("source paused", "source held")]
    if not paused:
        return None
    # The guest runs again when the destination's VM process releases its vCPUs (QEMU's RESUME event).
    resumed = [s for s in spans if s.name == "vm resume" and s.start > paused[-1].start]
    if not resumed:
        return None
    return paused[-1].start, resumed[0].end


def report(spans: list[Span], run: int) -> None:
    window = _window(spans)
    if window is None:
        print(f"run {run}: no switchover in the trace")
        return
    t0, t1 = window
    print(f"\nrun {run}: blackout {(t1 - t0) / 1e6:.2f} ms (source paused -> destination vCPUs released)")
    print(f"{'start ms':>9} {'end ms':>8} {'took':>7}  {'process':<26} {'thread':<22} span")
    names = {}
    for s in spans:
        names.setdefault(s.pid, s.process.rsplit("/", 1)[-1])
    for s in spans:
        if s.end < t0 or s.start > t1 + 500_000:
            continue
        if s.name.startswith("source ") and s.name not in ("source paused",):
            took = (s.end - s.start) / 1e6  # phases are cumulative from the pause: print the point
            who = f"{s.pid} {names[s.pid]}"[:26]
            print(f"{'':>9} {(s.end - t0) / 1e6:8.3f} {'':>7}  {who:<26} {s.thread[:22]:<22} {s.name} ({took:.3f})")
            continue
        print(
            f"{(s.start - t0) / 1e6:9.3f} {(s.end - t0) / 1e6:8.3f} {(s.end - s.start) / 1e6:7.3f}  "
            f"{f'{s.pid} {names[s.pid]}'[:26]:<26} {s.thread[:22]:<22} {s.name}"
        )


def main() -> int:
    exit_cleanly_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="idle")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--limit", type=int, default=50, help="downtime limit, ms")
    args = parser.parse_args()
    if OUT.exists():
        shutil.rmtree(OUT)
    size, memory, cmdline = SCENARIOS[args.scenario]
    for n in range(args.repeat):
        directory = (OUT / f"run-{n}").resolve()
        directory.mkdir(parents=True)
        os.environ["CVMOTION_TRACE"] = str(directory)  # the fabric's processes inherit it
        pair = HostPair.start()
        try:
            name = f"profile-{n}"
            pair.create_vm(name, cmdline=cmdline, memory=memory, size=size)
            pair.wait_console(pair.a, name, _ready, 180)
            time.sleep(0.5)  # let the heartbeat settle (the guest is idle: nothing to wait for)
            info = pair.migrate(name, downtime_limit_ms=args.limit, timeout=300)
            x = info.get("x-cvmotion", {})
            print(
                f"run {n}: {info['status']}, downtime {x.get('downtime-ms')} ms, phases {x.get('downtime-phases-ms')}"
            )
        finally:
            pair.close()
        report(parse(directory), n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
