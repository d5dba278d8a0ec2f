"""Run the benchmarks (``make bench``): each script in ``bench/`` with its defaults, one after another.

Each runs in its own process under a time limit and prints its own tables; a failure is reported and the next one
runs.  The end is a summary: which ran, how long, how each ended.  Some need what a fresh machine lacks (QEMU for
``migrate_vs_qemu``: it says so and measures cvmotion alone; PostgreSQL for ``controller_bench --db postgresql``)
and the migration ones need ``/dev/kvm``.  They take from seconds to tens of minutes each; ``--limit`` bounds each.

    .venv/bin/python bench/run_all.py [--list] [--only NAME ...] [--limit SECONDS]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def scripts() -> dict[str, Path]:
    """Every benchmark script by name (helpers start with ``_``; this runner is not one)."""
    return {p.stem: p for p in sorted(BENCH.glob("*.py")) if not p.stem.startswith("_") and p.stem != "run_all"}


def first_line(path: Path) -> str:
    text = path.read_text()
    start = text.find('"""')
    return text[start + 3 :].splitlines()[0].strip() if start >= 0 else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these (names as --list prints them)")
    parser.add_argument("--limit", type=float, default=3600.0, help="seconds each may run (default 3600)")
    args = parser.parse_args()
    known = scripts()
    if args.list:
        for name, path in known.items():
            print(f"{name:22s} {first_line(path)}")
        return 0
    chosen = args.only or list(known)
    unknown = [name for name in chosen if name not in known]
    if unknown:
        parser.error(f"no benchmark named {', '.join(unknown)} (see --list)")
    if not 1 <= args.limit <= 24 * 3600:
        parser.error("--limit: 1 s to 24 h")
    summary: list[tuple[str, str, float]] = []
    for name in chosen:
        print(f"\n=== {name}: {first_line(known[name])}", flush=True)
        start = time.monotonic()
        try:
            rc = subprocess.run([sys.executable, str(known[name])], cwd=BENCH.parent, timeout=args.limit).returncode
            ended = "ok" if rc == 0 else f"exit {rc}"
        except subprocess.TimeoutExpired:
            ended = f"stopped after {args.limit:.0f} s"
        summary.append((name, ended, time.monotonic() - start))
    print("\nbenchmark              seconds  ended")
    for name, ended, seconds in summary:
        print(f"{name:22s} {seconds:7.0f}  {ended}")
    return 0 if all(ended == "ok" for _, ended, _ in summary) else 1


if __name__ == "__main__":
    raise SystemExit(main())
