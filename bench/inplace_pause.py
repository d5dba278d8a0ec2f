"""bench: the pause of a memory-preserving update in place (pauseMs), over N updates of one host.

One host daemon on loopback with one or more kvstore VMs; each run is ``POST /v1/host/maintenance`` and waits for
its record.  ``pauseMs`` is what each VM process measured (monotonic clock, from its vCPUs being asked to stop to
their release): the host daemon and the platform process were both replaced in between.  Prints the machine, the
median and the maximum, and every run (``--json``: one object).

    .venv/bin/python bench/inplace_pause.py --runs 10 [--vms 1] [--backend kvm|emulated] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from cvmotion.testing.hosts import HostProcess
from cvmotion.vmm.kvm import kvm_usable


def machine() -> dict[str, Any]:
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    return {"cpu": model, "cpus": os.cpu_count(), "load": os.getloadavg()[0], "kernel": platform.release()}


def _poll(host: HostProcess, path: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            record: dict[str, Any] = host.api("GET", path, timeout=10)
            if record["status"] != "InProgress":
                return record
        except httpx.TransportError:
            pass  # the daemon is handing over: its successor answers in a moment
        time.sleep(0.05)
    raise SystemExit(f"{path}: still in progress after {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--vms", type=int, default=1)
    parser.add_argument("--backend", choices=("kvm", "emulated"), default="kvm" if kvm_usable()[0] else "emulated")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="inplace-bench-") as tmp:
        root = Path(tmp)
        host = HostProcess("bench-host", root / "host", root / "vendor", root / "pool-ca").start()
        try:
            for i in range(args.vms):
                body = {"name": f"kv{i}", "image": "kvstore", "memory": 16 << 20, "backend": args.backend}
                host.api("POST", "/v1/vms", body)
            runs = []
            for n in range(args.runs):
                host.api("POST", "/v1/host/maintenance", {"id": f"bench-{n}", "kind": "MemoryPreservingUpdate"})
                record = _poll(host, f"/v1/host/maintenance/bench-{n}", 300)
                if record["status"] != "Succeeded":
                    raise SystemExit(f"run {n} failed: {record['error']}")
                runs.append([vm["pauseMs"] for vm in record["vms"]])
                if not args.json:
                    print(f"run {n}: pauseMs {', '.join(f'{p:.1f}' for p in runs[-1])}", file=sys.stderr)
        finally:
            host.close()
    pauses = [p for run in runs for p in run]
    result = {
        "machine": machine(),
        "backend": args.backend,
        "vms": args.vms,
        "runs": args.runs,
        "pause_ms": {"median": statistics.median(pauses), "max": max(pauses), "min": min(pauses)},
        "per_run": runs,
    }
    if args.json:
        print(json.dumps(result))
    else:
        m = result["machine"]
        where = f"{m['cpu']} ({m['cpus']} CPUs, load {m['load']:.1f})"
        print(f"{where}, {args.backend}, {args.vms} VM(s), {args.runs} runs")
        print(f"pauseMs median {result['pause_ms']['median']:.1f}  max {result['pause_ms']['max']:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
