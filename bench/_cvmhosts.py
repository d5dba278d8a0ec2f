"""bench helper: two cvmotion hosts on loopback (``LocalFabric``), a memdirty VM on host A, a migration to B.

Everything is a real process: two host daemons, their platform processes (emulated AMD-SP + MA) and the VM
processes (KVM).  Every wait is bounded; ``close()`` ends every process the fabric started.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from cvmotion.host.fabric import FabricHost, LocalFabric

__all__ = ["HostPair", "cpu_seconds", "heartbeats"]

_HB = re.compile(r"^HB seq=(\d+) writes=(\d+) csum=([0-9a-f]{8})$")


def exit_cleanly_on_sigterm() -> None:
    """SIGTERM (``kill``, a CI timeout) runs the ``finally`` blocks that stop the hosts, as Ctrl-C does."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def heartbeats(lines: list[str]) -> list[tuple[int, int]]:
    """``(seq, writes)`` of every memdirty heartbeat line."""
    return [(int(m.group(1)), int(m.group(2))) for m in map(_HB.match, lines) if m]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# One keep-alive client for every call: ``httpx.request`` builds a new client (and an SSL context, loading the CA
# bundle) per call, and a bench polling that way burned a good part of a core next to the migration it measured.
_CLIENT = httpx.Client()


def _api(host: FabricHost, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 180) -> Any:
    response = _CLIENT.request(method, f"{host.url}{path}", json=body, timeout=timeout)
    if response.status_code >= 300:
        raise RuntimeError(f"{host.name}: {method} {path}: HTTP {response.status_code}: {response.text[:400]}")
    return response.json()


@dataclass
class HostPair:
    """Host A (source) and host B (destination) of one ``LocalFabric`` in a temporary directory."""

    fabric: LocalFabric
    a: FabricHost
    b: FabricHost
    root: Path
    made: list[str] = field(default_factory=list)

    @classmethod
    def start(cls) -> HostPair:
        root = Path(tempfile.mkdtemp(prefix="cvmotion-bench-"))
        fabric = LocalFabric(root, pool="bench")
        try:
            a = fabric.start_host("host-a")
            b = fabric.start_host("host-b")
        except BaseException:
            fabric.close()
            shutil.rmtree(root, ignore_errors=True)
            raise
        return cls(fabric, a, b, root)

    def create_vm(self, name: str, *, cmdline: str, memory: str | None = None, size: str | None = None) -> Any:
        body: dict[str, Any] = {"name": name, "image": "memdirty", "cmdline": cmdline, "vcpus": 1}
        if size:
            body["size"] = size  # the SKU's memory; one vCPU, because memdirty runs on one (as under QEMU)
        else:
            body["memory"] = memory
        vm = _api(self.a, "POST", "/v1/vms", body)
        self.made.append(name)
        return vm

    def console(self, host: FabricHost, vm: str, since: int = 0) -> tuple[list[str], int]:
        data = _api(host, "GET", f"/v1/vms/{vm}/console?since={since}")
        return [str(x) for x in data["lines"]], int(data["next"])

    def wait_console(
        self, host: FabricHost, vm: str, predicate: Callable[[list[str]], bool], timeout: float
    ) -> list[str]:
        """Poll the console until ``predicate(lines)`` holds; returns every line so far."""
        lines: list[str] = []
        since = 0
        deadline = time.monotonic() + timeout
        while True:
            new, since = self.console(host, vm, since)
            lines += new
            if predicate(lines):
                return lines
            if time.monotonic() > deadline:
                raise TimeoutError(f"{vm} on {host.name}: console condition not met in {timeout:.0f} s: {lines[-3:]}")
            time.sleep(0.1)

    def resumed_at(self, vm: str) -> float | None:
        """Unix time the destination resumed ``vm`` after its latest incoming migration (``x-cvmotion.resumed-at``)."""
        listed = _api(self.b, "GET", "/v1/migrations")["migrations"]
        stamps = [m["x-cvmotion"].get("resumed-at") for m in listed if m["x-cvmotion"].get("vm") == vm]
        stamps = [float(t) for t in stamps if t is not None]
        return max(stamps) if stamps else None

    def migrate(self, vm: str, *, timeout: float = 600.0, **options: Any) -> dict[str, Any]:
        """Migrate ``vm`` from A to B with the host API and poll ``query-migrate`` to the end (bounded)."""
        started = _api(self.a, "POST", f"/v1/vms/{vm}/migrate", {"destination": self.b.url, **options})
        mig = str(started["migration"])
        deadline = time.monotonic() + timeout
        while True:
            # Long-poll: the daemon answers when the migration settles (or after 5 s), so the bench does not
            # spend the cores it is measuring on polling.
            info: dict[str, Any] = _api(self.a, "GET", f"/v1/migrations/{mig}?wait=5")
            if info["status"] in ("completed", "failed", "cancelled"):
                return info
            if time.monotonic() > deadline:
                with contextlib.suppress(RuntimeError, httpx.HTTPError):
                    _api(self.a, "POST", f"/v1/migrations/{mig}/cancel")
                raise TimeoutError(f"migration {mig} still {info['status']} after {timeout:.0f} s")

    def delete(self, host: FabricHost, vm: str) -> None:
        with contextlib.suppress(RuntimeError, httpx.HTTPError):
            _api(host, "DELETE", f"/v1/vms/{vm}")

    def pids(self) -> dict[str, int]:
        """The processes whose CPU time a run reports."""
        out = {"src-daemon": self.a.process.pid, "dst-daemon": self.b.process.pid}
        for role, host in (("src", self.a), ("dst", self.b)):
            with contextlib.suppress(OSError, ValueError):
                out[f"{role}-platform"] = int((host.data_dir / "platform.pid").read_text())
        return out

    def vm_pid(self, host: FabricHost, vm: str) -> int | None:
        try:
            return int((host.data_dir / "vms" / vm / "pid").read_text())
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        self.fabric.close()
        shutil.rmtree(self.root, ignore_errors=True)
