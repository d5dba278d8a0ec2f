"""Benchmark: what one call between two processes of a host costs, hot and after the caller sat idle.

A switchover crosses processes about seven times (daemon -> platform -> VM process and back, then the same on the
destination), and on this kind of host each crossing costs far more than the socket itself.  Three peers answer
the same call over a Unix socket pair, in a child process each, measured in turn for every idle gap:

1. ``raw``: one byte there and back (``send`` / ``recv``): the kernel's and the scheduler's floor;
2. ``framed``: ``ipc.rpc``'s frame (16-byte head, JSON header, blob) read and written synchronously by one thread on
   each side: the floor for the same bytes built and parsed in Python;
3. ``endpoint``: ``ipc.rpc.Endpoint`` on both sides, the method served inline by the callee's reader (as the
   switchover's commands were until the seventh session, 2026-12-06): the connection's path, threads and all;
4. ``lane``: the same endpoints, the call on a lane (``Endpoint.open_lane``): the caller writes and reads its own
   socket, a thread of the callee's serves it — what the switchover's commands take now.

A gap is a ``sleep`` between calls: with none every call finds the code and data of both processes warm; after a
few milliseconds the caches and translations they need are someone else's again.

``--pin`` runs both ends on one CPU (no wake-up crosses CPUs); ``--spin`` keeps every CPU busy with a lowest-priority
spinner (no CPU halts while the caller sleeps): if either removed the cost after a gap, it would be the wake-up.

    .venv/bin/python bench/ipc_roundtrip.py [--calls 60] [--repeat 3] [--gaps 0,1,5,20,200] [--pin CPU] [--spin]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_facts, wait_quiet  # noqa: E402

from cvmotion.ipc.rpc import Call, Endpoint, Reply  # noqa: E402
from cvmotion.ipc.rpc import _read_frame as read_frame  # noqa: E402 - the frame itself, with no Endpoint around it
from cvmotion.ipc.rpc import _write_frame as write_frame  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PEERS = ("raw", "framed", "endpoint", "lane")


def _serve(peer: str, sock: socket.socket) -> None:
    """The callee, in the child: answers until the caller closes its end."""
    if peer == "raw":
        while data := sock.recv(64):
            sock.send(data)
    elif peer == "framed":
        while (message := read_frame(sock, [])) is not None:
            header, blob = message
            write_frame(sock, {"id": header["id"], "kind": "ok", "result": {"ok": True}}, blob[:16], ())
    else:  # endpoint, lane: the same callee; the caller decides

        def answer(call: Call) -> Reply:
            return Reply({"ok": True}, call.blob[:16])

        Endpoint(sock, answer, name="callee", inline=frozenset({"ping"})).wait_closed()


def _caller(peer: str, sock: socket.socket) -> tuple[Callable[[int], None], Callable[[], None]]:
    """One call of ``peer``'s kind, and how to hang up."""
    if peer == "raw":

        def raw(_: int) -> None:
            sock.send(b"x")
            sock.recv(64)

        return raw, sock.close
    if peer == "framed":

        def framed(n: int) -> None:
            write_frame(sock, {"id": n, "kind": "call", "method": "ping", "args": {"n": n}}, b"", ())
            read_frame(sock, [])

        return framed, sock.close
    endpoint = Endpoint(sock, None, name="caller")
    if peer == "lane" and not endpoint.open_lane(timeout=10):
        raise RuntimeError("the callee refused a lane")

    def call(n: int) -> None:
        endpoint.call("ping", {"n": n})

    return call, endpoint.close


def measure(peer: str, gap_ms: float, calls: int) -> list[float]:
    """Round trips (µs) of ``calls`` calls to a fresh child serving ``peer``, ``gap_ms`` of sleep before each."""
    mine, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the callee: nothing of the caller's but the socket
        mine.close()
        try:
            _serve(peer, theirs)
        finally:
            os._exit(0)
    theirs.close()
    call, hang_up = _caller(peer, mine)
    try:
        for n in range(5):  # connect, import and allocate before anything is timed
            call(n)
        out: list[float] = []
        for n in range(calls):
            if gap_ms:
                time.sleep(gap_ms / 1000)
            start = time.perf_counter()
            call(n)
            out.append((time.perf_counter() - start) * 1e6)
        return out
    finally:
        hang_up()
        os.waitpid(pid, 0)


def _spinner(cpu: int) -> subprocess.Popen[bytes]:
    """A lowest-priority busy loop on ``cpu`` (bounded: it ends by itself after 10 minutes)."""
    loop = "import time\nend = time.monotonic() + 600\nwhile time.monotonic() < end: pass"
    return subprocess.Popen(["taskset", "-c", str(cpu), "nice", "-n", "19", sys.executable, "-c", loop])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=60, help="timed calls per peer, gap and repeat")
    parser.add_argument("--repeat", type=int, default=3, help="rounds over the peers, interleaved")
    parser.add_argument("--gaps", default="0,1,5,20,200", help="idle gaps before each call, ms, comma-separated")
    parser.add_argument("--pin", type=int, default=None, help="run caller and callee on this one CPU")
    parser.add_argument("--spin", action="store_true", help="a nice-19 spinner on every CPU while measuring")
    parser.add_argument("--max-load", type=float, default=0.7, help="wait (bounded) for a 1-min load below this")
    parser.add_argument("--out", type=Path, default=REPO / "build" / "bench")
    args = parser.parse_args()
    try:
        gaps = [float(g) for g in args.gaps.split(",") if g.strip()]
    except ValueError:
        parser.error(f"--gaps: not a comma-separated list of milliseconds: {args.gaps!r}")
    if not gaps or min(gaps) < 0 or max(gaps) > 1000:
        parser.error("--gaps: each gap between 0 and 1000 ms")
    if not 1 <= args.calls <= 10_000 or not 1 <= args.repeat <= 20:
        parser.error("--calls 1..10000, --repeat 1..20")
    if args.pin is not None:
        if args.pin not in os.sched_getaffinity(0):
            parser.error(f"--pin: CPU {args.pin} is not one this process may run on")
        os.sched_setaffinity(0, {args.pin})  # the child inherits it
    console = Console(width=140)
    facts = machine_facts(
        {"pinned": "no" if args.pin is None else f"CPU {args.pin}", "spinners": "yes" if args.spin else "no"}
    )
    console.print(facts)
    wait_quiet(args.max_load, 60)
    samples: dict[tuple[str, float], list[float]] = {(p, g): [] for p in PEERS for g in gaps}
    spinners = [_spinner(cpu) for cpu in sorted(os.sched_getaffinity(0))] if args.spin else []
    try:
        for _ in range(args.repeat):
            for gap in gaps:
                for peer in PEERS:
                    samples[peer, gap] += measure(peer, gap, args.calls)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    table = Table(title="One call between two processes: round trip, median (p90), µs")
    table.add_column("idle before each call", justify="right")
    for peer in PEERS:
        table.add_column(peer, justify="right")
    results: list[dict[str, Any]] = []
    for gap in gaps:
        cells = []
        for peer in PEERS:
            values = sorted(samples[peer, gap])
            median, p90 = statistics.median(values), values[int(len(values) * 0.9)]
            cells.append(f"{median:,.0f} ({p90:,.0f})")
            results.append({"peer": peer, "gap_ms": gap, "median_us": median, "p90_us": p90, "calls": len(values)})
        table.add_row(f"{gap:g} ms", *cells)
    table.caption = (
        "raw: one byte there and back; framed: ipc.rpc's frame and JSON header, one thread a side; "
        "endpoint: ipc.rpc.Endpoint over its connection, served inline; lane: the same on a lane"
    )
    console.print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "ipc_roundtrip.json"
    path.write_text(json.dumps({"machine": facts, "results": results}, indent=2) + "\n")
    console.print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
