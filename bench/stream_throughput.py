"""Benchmark: the encrypted migration stream's throughput for an idle guest, next to its ceilings on this machine.

Measured in one run, so every figure sees the same machine:

1. AES-256-GCM on one core (``cryptography``): bulk (16 MiB per call) and per 4 KiB page with its own IV and
   AAD, as the stream seals them (one GCM invocation per page: the wire format's per-page tag and AAD);
2. loopback TCP, one stream, 2 MiB writes, between two processes: the transport's own ceiling;
3. writing fresh guest memory (a memfd, 1 MiB ``pwrite`` calls as the SP's imports): into pages never touched,
   into pages already allocated, and after ``fallocate`` of the whole range — what populating the destination's
   memory ahead of the stream could take off the critical path (the first touch of a page); and
   ``MADV_POPULATE_WRITE`` over a mapping of it (pages and page tables) followed by copies into the mapping, what
   an import that opened pages straight into guest memory would pay;
4. the emulated SP in one process: ``export_memory`` (seal, 512-page bundles straight from a memfd) and
   ``import_bundle`` (open from a private copy, write guest memory), in GB/s of sealed bundle bytes;
5. end to end: a guest that populated a large working set of non-zero pages and idles (memdirty
   ``dirty_mib=N rate=1``), live-migrated between two cvmotion hosts on loopback; round 0's sealed bytes
   over round 0's end-to-end time (the epoch is timed until the destination's firmware took its token,
   so every page is in the destination's memory), and the CPU each process spent per page.

    .venv/bin/python bench/stream_throughput.py [--mib 1024] [--fw-mib 256] [--repeat 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cvmhosts import HostPair, cpu_seconds, exit_cleanly_on_sigterm, heartbeats  # noqa: E402
from _machine import machine_facts, wait_quiet  # noqa: E402

from cvmotion.abi import wire  # noqa: E402
from cvmotion.abi.snp import PolicyFlag, Product  # noqa: E402
from cvmotion.abi.wire import bundle_capacity  # noqa: E402
from cvmotion.firmware.chip import Chip  # noqa: E402
from cvmotion.firmware.device import SecureProcessor  # noqa: E402
from cvmotion.firmware.kds import Kds  # noqa: E402
from cvmotion.firmware.launch import PageType  # noqa: E402
from cvmotion.firmware.vendor import Vendor  # noqa: E402
from cvmotion.platformd.hardware import SpMemory  # noqa: E402
from cvmotion.vmm.memory import GuestMemory  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PAGE = 4096
GB = 1e9
_MADV_POPULATE_WRITE = 23  # Linux 5.14+, <linux/mman.h>; Python 3.11's mmap module does not name it


def aes_bulk(seconds: float) -> float:
    """GB/s of AES-256-GCM over 16 MiB buffers (one call each) into a reused output."""
    aead = AESGCM(os.urandom(32))
    src = bytearray(os.urandom(16 << 20))
    out = bytearray(len(src) + 16)
    aead.encrypt_into(bytes(12), src, b"", out)
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        aead.encrypt_into(bytes(12), src, b"", out)
        n += 1
    return n * len(src) / elapsed / GB


def aes_per_page(seconds: float) -> float:
    """GB/s of AES-256-GCM one 4 KiB page per call, each with its own IV and 32-byte AAD."""
    aead = AESGCM(os.urandom(32))
    pages = memoryview(bytearray(os.urandom(512 * PAGE)))
    out = memoryview(bytearray(512 * (PAGE + 16)))
    ivs = [i.to_bytes(8, "little") + bytes(4) for i in range(512)]
    aad = bytes(32)
    encrypt_into = aead.encrypt_into
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for k in range(512):
            encrypt_into(ivs[k], pages[k * PAGE : (k + 1) * PAGE], aad, out[k * (PAGE + 16) : (k + 1) * (PAGE + 16)])
        n += 512
    return n * PAGE / elapsed / GB


def loopback_tcp(total: int = 512 << 20, chunk: int = 2 << 20) -> float:
    """GB/s of one loopback TCP stream between two processes (2 MiB writes, as the migration stream)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    pid = os.fork()
    if pid == 0:  # the sender
        try:
            with socket.create_connection(server.getsockname(), timeout=30) as conn:
                buf = memoryview(bytearray(chunk))
                for _ in range(total // chunk):
                    conn.sendall(buf)
        finally:
            os._exit(0)
    try:
        server.settimeout(30)
        conn, _ = server.accept()
        conn.settimeout(30)
        buf = memoryview(bytearray(chunk))
        got, start = 0, time.perf_counter()
        while got < total and (n := conn.recv_into(buf)):
            got += n
        elapsed = time.perf_counter() - start
        conn.close()
    finally:
        server.close()
        os.waitpid(pid, 0)
    return got / elapsed / GB


def first_touch(mib: int) -> dict[str, float]:
    """GB/s of writing ``mib`` MiB into a fresh memfd in 1 MiB ``pwrite`` calls, three ways (see the docstring)."""
    size, chunk = mib << 20, 1 << 20
    data = os.urandom(chunk)

    def fresh() -> int:
        fd = os.memfd_create("cvmotion-first-touch", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        return fd

    def write_all(fd: int) -> float:
        start = time.perf_counter()
        for offset in range(0, size, chunk):
            os.pwrite(fd, data, offset)
        return size / (time.perf_counter() - start) / GB

    fd = fresh()
    try:
        untouched = write_all(fd)
        allocated = write_all(fd)
    finally:
        os.close(fd)
    fd = fresh()
    try:
        start = time.perf_counter()
        os.posix_fallocate(fd, 0, size)
        fallocate = size / (time.perf_counter() - start) / GB
        after_fallocate = write_all(fd)
    finally:
        os.close(fd)
    populate = after_populate = float("nan")
    fd = fresh()
    try:
        with mmap.mmap(fd, size) as mapping:
            start = time.perf_counter()
            try:
                mapping.madvise(_MADV_POPULATE_WRITE)
            except OSError:  # before Linux 5.14: no such advice
                pass
            else:
                populate = size / (time.perf_counter() - start) / GB
                view = memoryview(mapping)
                start = time.perf_counter()
                for offset in range(0, size, chunk):
                    view[offset : offset + chunk] = data
                after_populate = size / (time.perf_counter() - start) / GB
                view.release()
    finally:
        os.close(fd)
    return {
        "untouched": untouched,
        "allocated": allocated,
        "fallocate": fallocate,
        "after_fallocate": after_fallocate,
        "populate": populate,
        "after_populate": after_populate,
    }


class _Hardware:
    """The hardware of one VM as the firmware sees it, in process (the platform process's view of a memfd)."""

    def __init__(self, memory: GuestMemory) -> None:
        self.guest = memory
        self.memory = SpMemory(memory)
        self.gfn_limit = memory.size >> 12
        self.paused = False

    def take_dirty(self, *, fresh: bool) -> npt.NDArray[np.uint64]:
        return np.zeros(0, dtype=np.uint64)

    def hold_paused(self) -> npt.NDArray[np.uint64]:
        return np.zeros(0, dtype=np.uint64)

    def capture_state(self) -> tuple[bytes, bytes]:
        return b"vcpu", b"device"

    def capture_and_harvest(self) -> tuple[bytes, bytes, npt.NDArray[np.uint64]]:
        return b"vcpu", b"device", np.zeros(0, dtype=np.uint64)

    def pause_capture_harvest(self) -> tuple[bytes, bytes, npt.NDArray[np.uint64]]:
        return b"vcpu", b"device", np.zeros(0, dtype=np.uint64)

    def restore_state(self, vcpu_state: bytes, device_state: bytes, *, run: bool = False) -> None:
        return None


def firmware_rates(mib: int, vendor: Vendor, work: Path) -> tuple[float, float]:
    """(seal GB/s, open GB/s) of the emulated SP over ``mib`` MiB of non-zero pages, 512-page bundles."""
    seeds = iter(range(70_000, 80_000))
    sps = [
        SecureProcessor(Chip.create(work / name, vendor, Product.GENOA, next(seeds)), endorsements=Kds(vendor))
        for name in ("src", "dst")
    ]
    size = (mib + 8) << 20
    src_hw, dst_hw = _Hardware(GuestMemory(size)), _Hardware(GuestMemory(size))
    try:
        pages = mib * 256
        base = 4 << 20
        words = np.frombuffer(src_hw.guest.view(base, pages * PAGE), dtype=np.uint64).reshape(pages, PAGE // 8)
        words[:, 0] = np.arange(1, pages + 1, dtype=np.uint64)  # one non-zero word per page, like memdirty
        del words  # the mapping cannot close while numpy holds it
        src, dst = sps[0].migration, sps[1].migration
        handle = sps[0].launch_start(int(PolicyFlag.RESERVED_MBO | PolicyFlag.SMT | PolicyFlag.MIGRATE_MA))
        sps[0].launch_update(handle, 0x100000, PageType.NORMAL, bytes(PAGE))
        sps[0].launch_finish(handle, host_data=bytes(32))
        sps[0].activate(handle)
        session = os.urandom(16)
        ref = dst.import_prepare(session, dst_hw)
        dst.ma_import_install_forward_key(ref, src.ma_export_prepare(handle, session))
        src.ma_export_install_backward_key(handle, dst.ma_import_generate_backward_key(ref))
        src.export_start(handle, src_hw)
        dst.import_bundle(ref, src.export_immutable(handle, 0))
        capacity = bundle_capacity(wire.MAX_PAGES_PER_BUNDLE)
        ring = memoryview(bytearray(capacity * (pages // wire.MAX_PAGES_PER_BUNDLE)))
        gfns = np.arange(base >> 12, (base >> 12) + pages, dtype=np.uint64)
        sealed: list[memoryview] = []
        start = time.perf_counter()
        for n, i in enumerate(range(0, pages, wire.MAX_PAGES_PER_BUNDLE)):
            out = ring[n * capacity : (n + 1) * capacity]
            length = src.export_memory(handle, n % 2, gfns[i : i + wire.MAX_PAGES_PER_BUNDLE], out)
            sealed.append(out[:length])
        seal = time.perf_counter() - start
        nbytes = sum(len(b) for b in sealed)
        private = memoryview(bytearray(capacity))
        start = time.perf_counter()
        for bundle in sealed:
            private[: len(bundle)] = bundle  # the platform opens a private copy of the shared ring
            dst.import_bundle(ref, private[: len(bundle)])
        opened = time.perf_counter() - start
        if dst_hw.guest.read(base, PAGE) != src_hw.guest.read(base, PAGE):
            raise AssertionError("the destination's memory differs from the source's")
        return nbytes / seal / GB, nbytes / opened / GB
    finally:
        src_hw.guest.close()
        dst_hw.guest.close()


# How the idle guest waits between its writes: spinning on the TSC (its vCPU takes a core the whole time) or
# halted on the LAPIC's TSC-deadline timer (memdirty ``halt=1``, as an idle OS does).
GUEST_IDLE = {"spin": "", "halt": " halt=1"}


def end_to_end(mib: int, repeat: int, max_load: float, console: Console, idles: list[str]) -> list[dict[str, Any]]:
    """Round-0 throughput of live migrations of an idle guest with ``mib`` MiB of non-zero pages (interleaved
    over ``idles``)."""
    runs: list[dict[str, Any]] = []
    pair = HostPair.start()
    try:
        for n, idle in ((n, idle) for n in range(repeat) for idle in idles):
            name = f"idle-{idle}-{n}"
            pair.create_vm(name, cmdline=f"dirty_mib={mib} rate=1{GUEST_IDLE[idle]}", memory=f"{mib + 64}M")
            try:
                pair.wait_console(pair.a, name, lambda lines: any(x.startswith("memdirty: ready") for x in lines), 600)
                load = wait_quiet(max_load, 60)
                pids = pair.pids()
                if (vm_pid := pair.vm_pid(pair.a, name)) is not None:
                    pids["src-vm"] = vm_pid
                cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
                info = pair.migrate(name, timeout=600)
                cpu = {k: cpu_seconds(p) - cpu0[k] for k, p in pids.items()}
                if info["status"] != "completed":
                    raise RuntimeError(f"migration failed: {info.get('error-desc')}")
                pair.wait_console(pair.b, name, lambda lines: bool(heartbeats(lines)), 30)
                round0 = info["x-cvmotion"]["rounds"][0]
                pages = int(round0["pages"])
                run = {
                    "guest": idle,
                    "pages": pages,
                    "bytes": int(round0["bytes"]),
                    "ms": float(round0["ms"]),
                    "gbps": int(round0["bytes"]) / float(round0["ms"]) / 1e6,
                    "total_ms": info["x-cvmotion"].get("total-time-ms"),
                    "downtime_ms": info["x-cvmotion"].get("downtime-ms"),
                    "cpu_us_per_page": {k: round(v / pages * 1e6, 2) for k, v in cpu.items()},
                    "load": load,
                }
                runs.append(run)
                console.print(
                    f"{time.strftime('%H:%M:%S')} guest {idle}s: round 0: {pages} pages, "
                    f"{run['bytes'] / 1e6:.0f} MB in "
                    f"{run['ms']:.0f} ms = {run['gbps']:.3f} GB/s (load {load:.2f}); CPU µs/page "
                    + ", ".join(f"{k} {v}" for k, v in run["cpu_us_per_page"].items())
                )
            finally:
                pair.delete(pair.b, name)
                pair.delete(pair.a, name)
    finally:
        pair.close()
    return runs


def main() -> int:
    exit_cleanly_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="idle guest's populated working set (MiB, ≤ 2048)")
    parser.add_argument("--fw-mib", type=int, default=256, help="MiB sealed and opened in process")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.0, help="per AES-GCM measurement")
    parser.add_argument("--max-load", type=float, default=0.7, help="wait (bounded) for a 1-min load below this")
    parser.add_argument("--out", type=Path, default=REPO / "build" / "bench")
    parser.add_argument(
        "--guest-idle",
        choices=["spin", "halt", "both"],
        default="both",
        help="the idle guest spins on the TSC or halts between writes (both: interleaved runs of each)",
    )
    args = parser.parse_args()
    idles = ["spin", "halt"] if args.guest_idle == "both" else [args.guest_idle]
    console = Console(width=150)
    facts = machine_facts()
    console.print(facts)
    wait_quiet(args.max_load, 60)
    bulk = statistics.median(aes_bulk(args.seconds) for _ in range(3))
    per_page = statistics.median(aes_per_page(args.seconds) for _ in range(3))
    tcp = statistics.median(loopback_tcp() for _ in range(3))
    touches = [first_touch(args.fw_mib * 2) for _ in range(3)]
    touch = {k: statistics.median(t[k] for t in touches) for k in touches[0]}
    with tempfile.TemporaryDirectory(prefix="cvmotion-stream-") as tmp:
        vendor = Vendor.open(Path(tmp) / "vendor")
        rates = [firmware_rates(args.fw_mib, vendor, Path(tmp) / f"fw{i}") for i in range(3)]
    seal = statistics.median(r[0] for r in rates)
    open_ = statistics.median(r[1] for r in rates)
    runs = end_to_end(args.mib, args.repeat, args.max_load, console, idles)
    e2e = {idle: statistics.median(r["gbps"] for r in runs if r["guest"] == idle) for idle in idles}
    t = Table(title=f"Encrypted stream throughput, idle guest with {args.mib} MiB of non-zero pages (medians)")
    t.add_column("what", style="bold")
    t.add_column("GB/s", justify="right")
    t.add_column("note")
    t.add_row("AES-256-GCM, one core, 16 MiB per call", f"{bulk:.2f}", "cryptography's OpenSSL; the cipher's ceiling")
    t.add_row(
        "AES-256-GCM, one core, one 4 KiB page per call", f"{per_page:.2f}", "per-page IV + AAD (the wire format)"
    )
    t.add_row("loopback TCP, one stream, 2 MiB writes", f"{tcp:.2f}", "the transport's ceiling, no crypto")
    t.add_row("pwrite into untouched guest memory", f"{touch['untouched']:.2f}", "memfd, 1 MiB calls: the first touch")
    t.add_row("pwrite into allocated guest memory", f"{touch['allocated']:.2f}", "the same pages written again")
    t.add_row("fallocate of guest memory", f"{touch['fallocate']:.2f}", "populating ahead of the stream")
    t.add_row("pwrite after fallocate", f"{touch['after_fallocate']:.2f}", "what is left on the critical path")
    t.add_row(
        "MADV_POPULATE_WRITE of guest memory", f"{touch['populate']:.2f}", "page tables too: opening into the mapping"
    )
    t.add_row("copy into the mapping after it", f"{touch['after_populate']:.2f}", "decrypting in place would leave")
    t.add_row("SP seal (export_memory), one core", f"{seal:.2f}", f"{args.fw_mib} MiB, 512-page bundles, in process")
    t.add_row("SP open (import_bundle), one core", f"{open_:.2f}", "private copy + open + write guest memory")
    for idle, gbps in e2e.items():
        cpu = {
            k: statistics.median(r["cpu_us_per_page"].get(k, 0.0) for r in runs if r["guest"] == idle)
            for k in runs[0]["cpu_us_per_page"]
        }
        t.add_row(
            f"end to end, round 0 (live migration), guest {'halted' if idle == 'halt' else 'spinning'} when idle",
            f"{gbps:.3f}",
            f"{args.mib} MiB sealed, sent, opened into the destination; {args.repeat} run(s); CPU µs/page "
            + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items()),
        )
    t.caption = f"{facts['cpu']}, {facts['cpus']} CPUs, kernel {facts['kernel']}; load {facts['loadavg']}"
    console.print(t)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "stream_throughput.json"
    path.write_text(
        json.dumps(
            {
                "machine": facts,
                "aes_gcm_bulk_gbps": bulk,
                "aes_gcm_per_page_gbps": per_page,
                "loopback_tcp_gbps": tcp,
                "guest_memory_write_gbps": touch,
                "sp_seal_gbps": seal,
                "sp_open_gbps": open_,
                "end_to_end_round0_gbps": e2e,  # by how the guest idles
                "runs": runs,
            },
            indent=2,
        )
    )
    console.print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
