"""Benchmark: the emulated AMD-SP's hot paths (cvmotion.firmware), on one core.

* MSG_REPORT_REQ end to end: guest seals the request (AES-256-GCM), the SP opens it, builds the report,
  signs it (ECDSA P-384), seals the reply, the guest opens it — what every (re-)attestation costs;
* MSG_KEY_REQ end to end (HKDF-SHA384 instead of a signature);
* LAUNCH_UPDATE of NORMAL pages (the PAGE_INFO SHA-384 chain), in MiB/s of guest image;
* KDS: a cached VCEK in process, the same over HTTP (uvicorn on loopback, keep-alive httpx client), and
  minting a VCEK for a new TCB (derive the key, RSA-4096 PSS signature by the ASK, write the cache);
* the one-off vendor hierarchy for a product (two RSA-4096 key generations).

Usage: .venv/bin/python bench/firmware_bench.py [--seconds 0.5] [--rounds 5] [--cpu N]
Each figure is the median of ``--rounds`` interleaved timed rounds; the process is pinned to one CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cryptography
import httpx
from rich.console import Console
from rich.table import Table

from cvmotion.abi.guest_msg import GuestChannel, GuestFieldSelect, KeyReq, RootKey
from cvmotion.abi.snp import Product, TcbVersion
from cvmotion.firmware.chip import Chip
from cvmotion.firmware.device import SecureProcessor
from cvmotion.firmware.kds import Kds, vcek_path
from cvmotion.firmware.kds_http import KdsServer
from cvmotion.firmware.launch import PAGE_SIZE, PageType
from cvmotion.firmware.vendor import Vendor

IMAGE_PAGES = 256  # 1 MiB per LAUNCH_UPDATE call


def rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls per second of ``fn`` over about ``seconds``."""
    fn()
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        n += 1
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cpu", type=int, default=0, help="CPU to pin to (-1: no pinning)")
    args = parser.parse_args()
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        vendor = Vendor.open(root / "vendor")
        vendor.roots(Product.GENOA)
        hierarchy_s = time.perf_counter() - start
        kds = Kds(vendor)
        chip = Chip.create(root / "host", vendor, Product.GENOA, seed=1)
        sp = SecureProcessor(chip, endorsements=kds)

        handle = sp.launch_start(0x30000)
        secrets = bytearray(PAGE_SIZE)
        sp.launch_update(handle, 0, PageType.SECRETS, secrets)
        image = os.urandom(IMAGE_PAGES * PAGE_SIZE)
        sp.launch_update(handle, PAGE_SIZE, PageType.NORMAL, image)  # warm-up; measured below on another guest
        sp.launch_finish(handle)
        sp.activate(handle)
        channel = GuestChannel(bytes(secrets[0x20:0x40]))
        measure_guest = sp.launch_start(0x30000)

        def report() -> None:
            channel.open_response(sp.guest_request(handle, channel.report_request(b"\x01" * 64)))

        key_req = KeyReq(root_key=RootKey.VMRK, guest_field_select=GuestFieldSelect.MEASUREMENT)

        def key() -> None:
            channel.open_response(sp.guest_request(handle, channel.key_request(key_req)))

        def launch_update() -> None:
            sp.launch_update(measure_guest, 0x100000, PageType.NORMAL, image)

        path = vcek_path(chip.product, chip.hwid, chip.reported_tcb)
        snp = iter(range(26, 256))

        def mint() -> None:
            tcb = TcbVersion(boot_loader=10, tee=0, snp=next(snp), microcode=84)
            kds.vcek_der(chip.product, chip.hwid, tcb)

        with KdsServer(kds) as server, httpx.Client(base_url=server.url) as http:

            def http_vcek() -> None:
                response = http.get(path)
                response.raise_for_status()

            cases: list[tuple[str, Callable[[], object], str]] = [
                ("MSG_REPORT_REQ end to end (seal, sign, open)", report, "reports/s"),
                ("MSG_KEY_REQ end to end (VMRK root)", key, "keys/s"),
                (f"LAUNCH_UPDATE NORMAL, {IMAGE_PAGES} pages per call", launch_update, "MiB/s"),
                ("KDS VCEK, cached, in process", lambda: kds.handle("GET", path), "req/s"),
                ("KDS VCEK, cached, HTTP keep-alive", http_vcek, "req/s"),
            ]
            results: dict[str, list[float]] = {name: [] for name, _, _ in cases}
            for _ in range(args.rounds):
                for name, fn, _ in cases:
                    results[name].append(rate(fn, args.seconds))
            mint_s = [_timed(mint) for _ in range(5)]

    table = Table(title="cvmotion emulated AMD-SP (one core)")
    table.add_column("operation")
    table.add_column("median", justify="right")
    table.add_column("unit")
    for name, _, unit in cases:
        value = statistics.median(results[name])
        if unit == "MiB/s":
            value *= IMAGE_PAGES * PAGE_SIZE / (1 << 20)
        table.add_row(name, f"{value:,.0f}", unit)
    table.add_row("KDS mint a VCEK for a new TCB", f"{statistics.median(mint_s) * 1000:,.1f}", "ms")
    table.add_row("vendor hierarchy for one product (2 x RSA-4096)", f"{hierarchy_s:,.2f}", "s (once)")
    console = Console()
    console.print(table)
    console.print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"cryptography {cryptography.__version__}, pinned to CPU {args.cpu}"
    )


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
