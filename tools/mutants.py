"""The mutation check (``make mutants``): disable each listed security check in turn and run the default-suite tests
that must notice; every mutant must be killed.

A mutant is data (``Mutant``, listed in ``tools/mutant_checks.py``): a file, one exact and unique snippet of its
source, the text that replaces it (usually the check's condition made a constant) and the tests to run.  The
runner copies the working tree to a scratch directory once (the repository itself is never modified), applies
one mutant at a time there, runs its tests with that copy first on ``PYTHONPATH`` (subprocesses the tests start
inherit it) and restores the file.
A snippet that no longer occurs exactly once is reported ``stale``, never skipped: the check moved, so the
mutant must follow it.

    .venv/bin/python tools/mutants.py                 # all mutants; exit 1 unless every one is killed
    .venv/bin/python tools/mutants.py --list          # the table of checks, without running anything
    .venv/bin/python tools/mutants.py --only ID ...   # some of them
    .venv/bin/python tools/mutants.py --markdown      # the result as the markdown table docs/design.md keeps

To add a check: append a ``Mutant`` to ``MUTANTS`` in ``tools/mutant_checks.py`` (an ``id`` of your choosing,
unique) naming the fastest default-suite tests that must fail without the check.  If it survives, the check has
no test: write one.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mutant_checks import MUTANTS, Mutant

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class Outcome:
    mutant: Mutant
    status: str  # killed | SURVIVED | STALE | ERROR
    by: str  # the first failing test, or why
    seconds: float


_FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.MULTILINE)


def _copy_tree(dest: Path) -> None:
    """The working tree as git sees it (tracked and untracked, not ignored) plus the built artefacts."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in listed:
        if not raw:
            continue
        rel = Path(os.fsdecode(raw))
        src = ROOT / rel
        if not src.is_file():
            continue  # deleted in the working tree
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    if (ROOT / "build").is_dir():
        (dest / "build").symlink_to(ROOT / "build")


def _pytest(tree: Path, tests: Sequence[str], timeout: float) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rfE", *tests]
    try:
        done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, ""
    return done.returncode, done.stdout + done.stderr


def run_mutant(tree: Path, mutant: Mutant, timeout: float) -> Outcome:
    t0 = time.monotonic()
    path = tree / mutant.file
    original = path.read_text()
    count = original.count(mutant.snippet)
    if count != 1:
        return Outcome(mutant, "STALE", f"snippet found {count} times in {mutant.file}", 0.0)
    path.write_text(original.replace(mutant.snippet, mutant.replacement))
    try:
        rc, out = _pytest(tree, mutant.tests, timeout)
    finally:
        path.write_text(original)
    seconds = time.monotonic() - t0
    if rc == -1:
        return Outcome(mutant, "killed", f"timeout after {timeout:.0f} s", seconds)
    if rc == 0:
        return Outcome(mutant, "SURVIVED", "every selected test passed", seconds)
    failed = _FAILED.search(out)
    if rc == 1 and failed is not None:
        return Outcome(mutant, "killed", failed.group(1), seconds)
    tail = out.strip().splitlines()[-1] if out.strip() else ""
    return Outcome(mutant, "ERROR", f"pytest exit {rc}: {tail}", seconds)


def table(outcomes: Sequence[Outcome]) -> str:
    lines = ["| # | check | file:function | killed | by |", "|---|---|---|---|---|"]
    for n, o in enumerate(outcomes, 1):
        m = o.mutant
        killed = "yes" if o.status == "killed" else o.status.lower() if o.status != "SURVIVED" else "**no**"
        where = f"`{m.file.removeprefix('cvmotion/')}:{m.function}`"
        lines.append(f"| {n} | {m.check} | {where} | {killed} | `{o.by}` |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--only", nargs="+", metavar="ID", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and check their snippets")
    parser.add_argument("--markdown", action="store_true", help="print the result as a markdown table")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant (a hang counts as killed)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the selected tests")
    args = parser.parse_args(argv)
    ids = [m.id for m in MUTANTS]
    if len(set(ids)) != len(ids):
        raise SystemExit("mutant ids must be unique")
    chosen = [m for m in MUTANTS if not args.only or m.id in args.only]
    unknown = set(args.only or ()) - set(ids)
    if unknown:
        raise SystemExit(f"unknown mutants: {', '.join(sorted(unknown))}")
    if args.list:
        for m in chosen:
            count = (ROOT / m.file).read_text().count(m.snippet)
            state = "ok" if count == 1 else f"STALE ({count} matches)"
            print(f"{m.id:22} {state:18} {m.file}:{m.function}  {m.check}")
        return 0
    with tempfile.TemporaryDirectory(prefix="cvmotion-mutants-") as scratch:
        tree = Path(scratch)
        _copy_tree(tree)
        if not args.no_baseline:
            tests = sorted({t for m in chosen for t in m.tests})
            rc, out = _pytest(tree, tests, args.timeout * 2)
            if rc != 0:
                print(out[-4000:])
                print("the unmutated tests do not pass: fix them before the mutation check", file=sys.stderr)
                return 2
        outcomes: list[Outcome] = []
        for m in chosen:
            outcome = run_mutant(tree, m, args.timeout)
            outcomes.append(outcome)
            line = f"{m.id:22} {outcome.status:9} {outcome.seconds:6.1f} s  {outcome.by}"
            print(line, file=sys.stderr if args.markdown else sys.stdout, flush=True)
    killed = sum(o.status == "killed" for o in outcomes)
    if args.markdown:
        print(table(outcomes))
    print(f"\n{killed}/{len(outcomes)} mutants killed", file=sys.stderr if args.markdown else sys.stdout)
    return 0 if killed == len(outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
