"""Shared helpers for the process-level migration tests: hosts, the proxy, victim VMs and the end checks.

``World`` is two real hosts on loopback: host-a (source) and host-b, whose migration listener sits behind the
adversary's ``MigrationProxy`` (``--migration-advertise``).  ``Victim`` is one memdirty VM with its canaries
and heartbeat model.  ``World.finish`` asserts what every attack and fault must end with: the VM runs on
exactly one host (or is stopped everywhere), memory is intact and not rolled back, and no canary was ever
visible to the untrusted side: the proxy's bytes, the host API's answers, every file in the hosts' data
directories (logs included) and both daemons' memory.  The canaries: the guest's VMPCK0..3, keys the SP
derived for it (VMRK- and VCEK-rooted) and memdirty plaintext that crossed the wire sealed.
"""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvmotion.abi.snp import Product
from cvmotion.firmware.chip import default_tcb
from cvmotion.testing.adversary import MigrationProxy, Tamper
from cvmotion.testing.canary import (
    GuestMemoryTap,
    InFlightCanaries,
    find_canaries,
    guest_key_canaries,
    memdirty_canaries,
    scan_process,
    scan_tree,
    secrets_canaries,
)
from cvmotion.testing.hostcmd import HostCommands
from cvmotion.testing.hosts import ApiError, HostProcess
from cvmotion.testing.invariants import MemdirtyWatch, Placement, SafetyViolation, assert_single_instance, settle

MEMORY = 16 << 20
UPDATED_SNP = default_tcb(Product.GENOA).snp + 2  # the attack world's host-a and host-b run patched firmware
DIRTY_MIB = 2
FINAL = ("completed", "failed", "cancelled")


@dataclass
class Victim:
    """A memdirty VM made for one test, its "hardware" tap and its canaries."""

    name: str
    seed: int
    tap: GuestMemoryTap
    watch: MemdirtyWatch | None  # None: not a memdirty guest
    canaries: list[bytes] = field(default_factory=list)
    in_flight: InFlightCanaries | None = None

    def all_canaries(self) -> list[bytes]:
        extra = self.in_flight.canaries if self.in_flight is not None else []
        return [*self.canaries, *extra]


def _set_firmware(host: HostProcess, snp_spl: int) -> None:
    """The operator makes the chip and installs firmware at ``snp_spl`` before the daemon ever runs."""
    steps = [("create", "--vendor-dir", str(host.vendor_dir))] if not (host.data_dir / "chip.json").exists() else []
    steps.append(("set-tcb", "--snp", str(snp_spl)))
    for verb, *args in steps:
        cmd = [sys.executable, "-m", "cvmotion", "platform", verb, "--data-dir", str(host.data_dir), *args]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)


class World:
    """host-a, host-b (behind the proxy) and the proxy; VMs are made per test."""

    def __init__(self, root: Path, vendor_dir: Path, pool_ca_dir: Path, *, backend: str = "kvm") -> None:
        self.root = root
        self.backend = backend  # every VM made here runs on it ("kvm" or "emulated"); a migrated VM keeps it
        self.proxy = MigrationProxy(io_timeout=60.0).start()
        self.a = HostProcess("host-a", root / "a", vendor_dir, pool_ca_dir)
        self.b = HostProcess("host-b", root / "b", vendor_dir, pool_ca_dir, advertise=self.proxy.address)
        self.proxy.upstream = ("127.0.0.1", self.b.migration_port)
        self.extra: list[HostProcess] = []

    @property
    def hosts(self) -> list[HostProcess]:
        return [self.a, self.b, *self.extra]

    def start(self, *, snp_spl: int | None = None) -> World:
        """Start host-a and host-b; ``snp_spl``: both run firmware updated to that SNP SPL first."""
        for host in (self.a, self.b):
            # Both MAs speak protocol versions 1..2 (2 is the test alias of 1): a downgrade is then observable.
            host.data_dir.mkdir(parents=True, exist_ok=True)
            (host.data_dir / "ma-config.json").write_text(json.dumps({"versions": [1, 2]}))
            if snp_spl is not None:
                _set_firmware(host, snp_spl)
            host.start()
        return self

    def extra_host(
        self, name: str, *, pool: str = "pool-a", vendor_dir: Path | None = None, snp_spl: int | None = None
    ) -> HostProcess:
        """Another host (started once per world): another pool, another vendor, or firmware at a lower SNP SPL."""
        for host in self.extra:
            if host.name == name:
                return host
        vendor = vendor_dir or self.a.vendor_dir
        host = HostProcess(name, self.root / name, vendor, self.a.pool_ca_dir, pool=pool)
        if snp_spl is not None:
            _set_firmware(host, snp_spl)
        self.extra.append(host.start())
        return host

    def close(self) -> None:
        for host in self.hosts:
            host.close()
        self.proxy.close()

    # -- VMs ----------------------------------------------------------------------------------------

    def new_vm(self, name: str, *, seed: int = 1, host: HostProcess | None = None, **create: Any) -> Victim:
        host = host or self.a
        cmdline = f"dirty_mib={DIRTY_MIB} rate=20000 hb_ms=100 seed={seed}"
        body = {"name": name, "image": "memdirty", "memory": MEMORY, "cmdline": cmdline, "backend": self.backend}
        host.api("POST", "/v1/vms", {**body, **create})
        assert host.vms()[name]["backend"] == self.backend
        watch = MemdirtyWatch(DIRTY_MIB, seed)
        watch.check(host, name)
        pid = host.vm_pid(name)
        assert pid is not None
        tap = GuestMemoryTap(pid, MEMORY)
        rng = random.Random(seed)
        keys = self.guest_keys(host, name, tap)
        canaries = keys + memdirty_canaries(tap, dirty_mib=DIRTY_MIB, rng=rng, count=2)
        return Victim(name, seed, tap, watch, canaries)

    @staticmethod
    def guest_keys(host: HostProcess, name: str, tap: GuestMemoryTap) -> list[bytes]:
        """VMPCK0..3 and keys the SP derives for the guest (asked for over VMPCK0, relayed as the host does)."""
        vmpcks = secrets_canaries(tap)
        handle = int(host.vms()[name]["handle"])
        with HostCommands(host.data_dir) as cmd:
            platform = cmd.platform()
            derived = guest_key_canaries(vmpcks[0], lambda m: platform.call("guest_request", {"handle": handle}, m)[1])
        return [*vmpcks, *derived.values()]

    def new_kv_vm(self, name: str, *, host: HostProcess | None = None) -> Victim:
        """A kvstore VM (its memory holds what clients PUT: device I/O, so its canaries are the VMPCKs)."""
        host = host or self.a
        body = {"name": name, "image": "kvstore", "memory": MEMORY, "cmdline": "hb_ms=100", "backend": self.backend}
        host.api("POST", "/v1/vms", body)
        pid = host.vm_pid(name)
        assert pid is not None
        tap = GuestMemoryTap(pid, MEMORY)
        return Victim(name, 0, tap, None, self.guest_keys(host, name, tap))

    def drop_vm(self, victim: Victim) -> None:
        victim.tap.close()
        for host in self.hosts:
            if host.running():
                with contextlib.suppress(ApiError, OSError):
                    host.api("DELETE", f"/v1/vms/{victim.name}")

    # -- migrations ---------------------------------------------------------------------------------

    def start_migration(
        self, victim: Victim, tamper: Tamper | None = None, *, src: HostProcess | None = None, **options: Any
    ) -> str:
        """Install ``tamper`` (wrapped to collect in-flight canaries) and start migrating ``victim`` to host-b."""
        src = src or self.a
        rng = random.Random(victim.seed)
        victim.in_flight = InFlightCanaries(victim.tap, tamper, rng=rng, dirty_mib=DIRTY_MIB, limit=4)
        self.proxy.reset(victim.in_flight)
        body = {"destination": self.b.url, "io_timeout_s": 8.0, "commit_timeout_s": 15.0, **options}
        return str(src.api("POST", f"/v1/vms/{victim.name}/migrate", body)["migration"])

    def wait_migration(self, mig_id: str, *, src: HostProcess | None = None, timeout: float = 60.0) -> dict[str, Any]:
        src = src or self.a
        deadline = time.monotonic() + timeout
        while True:
            info: dict[str, Any] = src.api("GET", f"/v1/migrations/{mig_id}")
            # Final once the outcome is known too (the status flips first).
            if info["status"] in FINAL and info["x-cvmotion"]["outcome"]:
                return info
            if time.monotonic() > deadline:
                raise SafetyViolation(f"migration {mig_id} still {info['status']} after {timeout:.0f} s")
            time.sleep(0.05)

    def migrate(self, victim: Victim, tamper: Tamper | None = None, **options: Any) -> dict[str, Any]:
        return self.wait_migration(self.start_migration(victim, tamper, **options))

    # -- the end of every test ----------------------------------------------------------------------

    def finish(self, victim: Victim, *, expect_host: str | None = None, timeout: float = 60.0) -> Placement:
        """The invariants: one running instance with intact, not rolled back memory; no canary leaked."""
        placement = settle(self.hosts, victim.name, timeout)
        if expect_host is not None:
            assert placement.host == expect_host, f"VM runs on {placement.host}, expected {expect_host}"
        assert assert_single_instance(self.hosts, victim.name) is not None
        host = next(h for h in self.hosts if h.name == placement.host)
        if victim.watch is not None:
            victim.watch.check(host, victim.name)
        self.assert_no_leak(victim)
        return placement

    def assert_no_leak(self, victim: Victim) -> None:
        canaries = victim.all_canaries()
        carried = self.proxy.carried()
        leaked = find_canaries(carried, canaries)
        assert not leaked, f"guest plaintext crossed the untrusted network: canaries {leaked}"
        for host in self.hosts:
            answered = find_canaries(host.responses, canaries)
            assert not answered, f"host {host.name}'s API answered with guest keys or plaintext: canaries {answered}"
            stored = scan_tree(host.data_dir, canaries)
            assert not stored, f"guest keys or plaintext in {host.name}'s data directory: {stored}"
            if not host.running():
                continue
            scan = scan_process(host.pid, canaries)
            assert scan.scanned > 1 << 20
            assert not scan.hits, f"daemon {host.name} holds guest plaintext: canaries {scan.hits} in {scan.where}"
