"""The same guest images boot under QEMU (``-kernel`` multiboot loader) and compute the same checksums.

    qemu-system-x86_64 -enable-kvm -m 64 -display none -serial stdio -monitor none -no-reboot \\
        -device isa-debug-exit,iobase=0xf4,iosize=4 -kernel build/guests/memdirty.elf -append "dirty_mib=1"
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
from vmm_helpers import require_image

from cvmotion.vmm.images import guest_dir
from cvmotion.vmm.kvm import kvm_usable
from cvmotion.vmm.workloads import MemdirtyModel, parse_heartbeat

QEMU = shutil.which("qemu-system-x86_64")
pytestmark = [
    pytest.mark.qemu,
    pytest.mark.kvm,
    pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed"),
    pytest.mark.skipif(not kvm_usable()[0], reason="/dev/kvm unusable (the QEMU check runs with -enable-kvm)"),
    pytest.mark.timeout(180),
]


def _qemu(image: str, append: str) -> list[str]:
    assert QEMU is not None
    return [
        QEMU, "-enable-kvm", "-m", "64", "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel", str(Path(guest_dir()) / f"{image}.elf"),
        "-append", append,
    ]  # fmt: skip


def _lines_until(cmd: list[str], pattern: str, count: int, timeout: float) -> list[str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if sum(pattern in x for x in lines) >= count or time.monotonic() > deadline:
                break
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    return lines


def test_memdirty_under_qemu_matches_the_model() -> None:
    require_image("memdirty")
    lines = _lines_until(_qemu("memdirty", "dirty_mib=1 rate=2000 hb_ms=200 seed=4"), "HB ", 2, 120)
    beats = [b for b in map(parse_heartbeat, lines) if b]
    assert len(beats) >= 2, lines
    model = MemdirtyModel(dirty_mib=1, seed=4)
    for _, writes, csum in beats:
        assert model.checksum_at(writes) == csum


def test_memdirty_halting_under_qemu_wakes_on_its_timer() -> None:
    """``halt=1`` under QEMU (after its BIOS, which leaves the PIT's IRQ0 unmasked on the legacy PIC): the guest
    sleeps on the LAPIC's TSC-deadline timer (qemu64 needs ``+tsc-deadline``), wakes, and writes on."""
    require_image("memdirty")
    cmd = _qemu("memdirty", "dirty_mib=1 rate=500 hb_ms=200 seed=6 halt=1")
    cmd[2:2] = ["-cpu", "qemu64,+tsc-deadline"]
    lines = _lines_until(cmd, "HB ", 3, 120)
    assert any(line.startswith("memdirty: halting between writes") for line in lines), lines
    beats = [b for b in map(parse_heartbeat, lines) if b]
    assert len(beats) >= 3, lines
    assert beats[-1][1] > beats[0][1]
    model = MemdirtyModel(dirty_mib=1, seed=6)
    for _, writes, csum in beats:
        assert model.checksum_at(writes) == csum


def test_kvstore_without_cvmio_only_heartbeats() -> None:
    require_image("kvstore")
    lines = _lines_until(_qemu("kvstore", "hb_ms=200"), "HB ", 1, 120)
    assert any("cvm-io device absent" in line and "0xffffffff" in line for line in lines), lines


def test_exit_port_under_qemu() -> None:
    require_image("probe")
    done = subprocess.run(_qemu("probe", "action=exit code=3"), capture_output=True, text=True, timeout=120)
    assert done.returncode == (3 << 1) | 1  # isa-debug-exit: QEMU exits with (code << 1) | 1
