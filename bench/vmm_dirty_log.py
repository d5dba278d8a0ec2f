"""Benchmark: one dirty-log harvest (KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG + GFN extraction) per slot size.

A memdirty guest dirties a 4 MiB working set at full speed while the VMM harvests repeatedly; the
VM has 1 GiB or 64 GiB of RAM (64 GiB = a 3 GiB slot below the hole and a 61 GiB slot above it; the
bitmap size is what a harvest pays for).  GET/CLEAR columns are per harvest, summed over the slots.
Also times enabling the log (the one-time baseline clear that KVM_DIRTY_LOG_INITIALLY_SET requires).

    .venv/bin/python bench/vmm_dirty_log.py [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from cvmotion.vmm.dirty import DirtyLog, bitmap_words
from cvmotion.vmm.images import load_image
from cvmotion.vmm.kvm import kvm_usable
from cvmotion.vmm.layout import GIB
from cvmotion.vmm.vm import MachineConfig, Vm


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:8.2f} ms (p90 {sorted(values)[int(len(values) * 0.9)] * 1e3:7.2f})"


def bench(size_gib: int, rounds: int) -> None:
    vm = Vm.create(MachineConfig(size_gib * GIB), load_image("memdirty"), "dirty_mib=4 rate=0 hb_ms=1000")
    try:
        vm.start()
        vm.console.wait_for("ready", 30)
        t0 = time.perf_counter()
        vm.start_dirty_tracking()
        enable = time.perf_counter() - t0
        backend = vm.backend
        get, clear, extract, total, counts = [], [], [], [], []
        for _ in range(rounds):
            time.sleep(0.05)
            t0 = time.perf_counter()
            bitmaps = []
            get_s = clear_s = 0.0
            # The harvest as KvmBackend does it, timed per step and summed over the VM's slots.
            for region in vm.memory.layout.regions:
                words = np.zeros(bitmap_words(region.npages), dtype=np.uint64)
                t1 = time.perf_counter()
                backend._vm.get_dirty_log(region.slot, words)  # type: ignore[attr-defined]
                t2 = time.perf_counter()
                if words.any():
                    backend._vm.clear_dirty_log(region.slot, 0, region.npages, words)  # type: ignore[attr-defined]
                t3 = time.perf_counter()
                get_s += t2 - t1
                clear_s += t3 - t2
                bitmaps.append((region, words))
            get.append(get_s)
            clear.append(clear_s)
            t4 = time.perf_counter()
            gfns = DirtyLog(bitmaps).gfns()
            t5 = time.perf_counter()
            extract.append(t5 - t4)
            total.append(t5 - t0)
            counts.append(gfns.size)
        print(
            f"| {size_gib:>4} GiB | {enable * 1e3:9.1f} ms | {_ms(get)} | {_ms(clear)} | {_ms(extract)} | "
            f"{_ms(total)} | {int(statistics.median(counts)):>6} |"
        )
    finally:
        vm.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--sizes", default="1,64")
    args = parser.parse_args()
    ok, reason = kvm_usable()
    if not ok:
        print(f"skipped: /dev/kvm unusable ({reason})", file=sys.stderr)
        return 0
    print("| slot | enable log | GET_DIRTY_LOG | CLEAR_DIRTY_LOG | extract GFNs | harvest total | dirty pages |")
    print("|---|---|---|---|---|---|---|")
    for size in (int(s) for s in args.sizes.split(",")):
        bench(size, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
