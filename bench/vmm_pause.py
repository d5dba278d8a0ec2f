"""Benchmark: pause-to-captured-state latency (``Vm.pause()`` + ``Vm.capture_state()``), both backends.

Two guests: memdirty writing at full speed (a busy vCPU, inside KVM_RUN or unicorn), and kvstore blocked
inside a cvm-io WAIT_REQUEST (the device must answer RETRY at once).  With two vCPUs the application
processor (waiting for SIPI) is captured too.

    .venv/bin/python bench/vmm_pause.py [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import time

from cvmotion.vmm.backend import BackendKind
from cvmotion.vmm.images import load_image
from cvmotion.vmm.kvm import kvm_usable
from cvmotion.vmm.layout import MIB
from cvmotion.vmm.vm import MachineConfig, Vm


def _us(values: list[float]) -> str:
    ordered = sorted(values)
    return f"{statistics.median(values) * 1e6:7.0f} µs | {ordered[int(len(ordered) * 0.9)] * 1e6:7.0f} µs"


def bench(kind: BackendKind, image: str, cmdline: str, rounds: int, vcpus: int) -> None:
    vm = Vm.create(MachineConfig(64 * MIB, vcpus, kind), load_image(image), cmdline)
    try:
        vm.start()
        vm.console.wait_for("ready", 30)
        pause, total, sizes = [], [], []
        for _ in range(rounds):
            time.sleep(0.02)
            t0 = time.perf_counter()
            vm.pause()
            t1 = time.perf_counter()
            state = vm.capture_state()
            t2 = time.perf_counter()
            vm.resume()
            pause.append(t1 - t0)
            total.append(t2 - t0)
            sizes.append(len(state.to_bytes()))
        print(f"| {kind.value} | {image} | {vcpus} | {_us(pause)} | {_us(total)} | {sizes[-1]} B |")
    finally:
        vm.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    kinds = [BackendKind.KVM] if kvm_usable()[0] else []
    kinds.append(BackendKind.EMULATED)
    print("| backend | guest | vCPUs | pause median | pause p90 | pause+capture median | p90 | state |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in kinds:
        for vcpus in (1, 2):
            bench(kind, "memdirty", "dirty_mib=4 rate=0 hb_ms=1000", args.rounds, vcpus)
            bench(kind, "kvstore", "hb_ms=5000", args.rounds, vcpus)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
