"""Benchmark: the attestation service end to end — attestations per second and latency percentiles.

Real HTTP against a real ``cvmotion attestation serve`` process (uvicorn, ``--workers`` processes) on
loopback.  Each request carries a *distinct* emulated report whose REPORT_DATA binds distinct runtime data
(SHA-256), plus its VCEK chain, so the service does the full work every time: JSON + base64url decode,
report parse, ECDSA P-384 signature verification, chain checks (the chain's RSA-4096 signatures are cached
after the first request per worker — "cached chains"), runtime-data binding, policy, claims, RS256 signing.
The client is a lean asyncio HTTP/1.1 keep-alive client (``--concurrency`` connections) on the same 2-core
machine, bounded by ``--count`` requests and ``--seconds``; every response is checked (200 and a JWT).

Usage: .venv/bin/python bench/attestation_bench.py [--workers 2] [--concurrency 16] [--count 3000] [--seconds 15]
                                                  [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cvmotion.abi.guest_msg import GuestChannel, ReportRsp
from cvmotion.abi.snp import Product
from cvmotion.attestation.client import AttestationClient
from cvmotion.firmware.chip import Chip
from cvmotion.firmware.device import SecureProcessor
from cvmotion.firmware.kds import Kds
from cvmotion.firmware.launch import PAGE_SIZE, PageType
from cvmotion.firmware.vendor import Vendor


def make_requests(vendor: Vendor, host_dir: Path, n: int) -> list[bytes]:
    """``n`` distinct request bodies from one emulated guest (a fresh nonce bound in each report)."""
    sp = SecureProcessor(Chip.create(host_dir, vendor, Product.GENOA, 99), endorsements=Kds(vendor))
    handle = sp.launch_start(0x30000)
    sp.launch_update(handle, 0, PageType.NORMAL, b"bench".ljust(PAGE_SIZE, b"\0"))
    secrets = bytearray(PAGE_SIZE)
    sp.launch_update(handle, PAGE_SIZE, PageType.SECRETS, secrets)
    sp.launch_finish(handle)
    sp.activate(handle)
    channel = GuestChannel(bytes(secrets[0x20:0x40]))
    chain = sp.get_ext_certs().pem()
    bodies = []
    for i in range(n):
        runtime = json.dumps({"nonce": f"{i:016x}"}).encode()
        msg = channel.report_request(hashlib.sha256(runtime).digest().ljust(64, b"\0"))
        report = ReportRsp.from_bytes(channel.open_response(sp.guest_request(handle, msg))).report
        doc = AttestationClient.evidence_body(report, chain, runtime, data_type="JSON")
        bodies.append(json.dumps(doc).encode())
    return bodies


def start_service(data_dir: Path, vendor: Path, workers: int) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "cvmotion", "attestation", "serve", "--data-dir", str(data_dir)]
    cmd += ["--listen", "127.0.0.1:0", "--emulated-vendor-dir", str(vendor), "--workers", str(workers)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the service binds before it prints, so the URL is connectable
    if "listening on" not in line:
        proc.kill()
        raise SystemExit(f"service did not start: {line!r}")
    return proc, line.split()[-1]


async def run_load(
    url: str, bodies: list[bytes], concurrency: int, count: int, seconds: float
) -> tuple[list[float], int, float]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    requests = [
        b"POST /attest/SevSnpVm HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(b)}\r\n\r\n".encode()
        + b
        for b in bodies
    ]
    latencies: list[float] = []
    errors = 0
    next_index = 0
    deadline = time.perf_counter() + seconds

    async def connection() -> None:
        nonlocal errors, next_index
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while next_index < count and time.perf_counter() < deadline:
                request = requests[next_index % len(requests)]
                next_index += 1
                start = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                payload = await reader.readexactly(length)
                latencies.append(time.perf_counter() - start)
                if not head.startswith(b"HTTP/1.1 200") or payload.count(b".") != 2:
                    errors += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--distinct", type=int, default=2000, help="distinct reports (cycled)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds against the same server")
    args = parser.parse_args()
    console = Console(width=120)
    with tempfile.TemporaryDirectory(prefix="cvm-attest-bench-") as tmp:
        root = Path(tmp)
        vendor = Vendor.open(root / "vendor")
        t0 = time.perf_counter()
        bodies = make_requests(vendor, root / "host", args.distinct)
        console.print(f"{len(bodies)} distinct evidence bodies in {time.perf_counter() - t0:.1f} s")
        proc, url = start_service(root / "svc", root / "vendor", args.workers)
        rounds = []
        try:
            warm = min(len(bodies), 50 * args.workers)
            asyncio.run(run_load(url, bodies[:warm], min(args.concurrency, warm), warm, 30))  # chain caches
            for _ in range(args.rounds):
                rounds.append(asyncio.run(run_load(url, bodies, args.concurrency, args.count, args.seconds)))
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    table = Table(title="attestation service: POST /attest/SevSnpVm (real HTTP, loopback)")
    for col in ("round", "workers", "conns", "requests", "errors", "attest/s", "p50 ms", "p99 ms", "max ms"):
        table.add_column(col, justify="right")
    rates = []
    errors_total = 0
    for i, (latencies, errors, elapsed) in enumerate(rounds, 1):
        latencies.sort()
        n = len(latencies)
        q = statistics.quantiles(latencies, n=100, method="inclusive") if n > 1 else latencies * 99
        rates.append(n / elapsed)
        errors_total += errors
        table.add_row(
            str(i),
            str(args.workers),
            str(args.concurrency),
            str(n),
            str(errors),
            f"{n / elapsed:,.0f}",
            f"{q[49] * 1e3:.1f}",
            f"{q[98] * 1e3:.1f}",
            f"{latencies[-1] * 1e3:.1f}",
        )
    console.print(table)
    console.print(f"median {statistics.median(rates):,.0f} attestations/s over {len(rates)} rounds")
    cpu = platform.processor() or platform.machine()
    console.print(f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}; client on the same machine")
    if errors_total:
        raise SystemExit(f"{errors_total} requests failed")


if __name__ == "__main__":
    main()
