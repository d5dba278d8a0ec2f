"""testing: the safety invariants every attack and fault test ends with (DESIGN section 1 and 6).

- **single instance**: at most one VM process of the VM executes guest code, across every host — asked of
  the hosts' APIs *and* of the VM processes themselves (their control sockets), and watched over a window:
  at most one console may advance (a paused or frozen VM prints nothing);
- **no rollback, no corruption** (memdirty): the last heartbeat's checksum equals ``MemdirtyModel`` at that
  write count, and the write count never goes backwards across checks — a guest restarted, resumed over
  stale memory or rolled back prints something else;
- **no lost write** (kvstore): every PUT the host API acknowledged is readable with its value.

``settle`` waits (bounded) until the VM runs on exactly one host with no migration half-done anywhere.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from cvmotion.errors import CvmError
from cvmotion.ipc.rpc import connect_unix
from cvmotion.testing.hosts import ApiError, HostProcess
from cvmotion.vmm.workloads import MemdirtyModel, parse_heartbeat

__all__ = [
    "KvLedger",
    "MemdirtyWatch",
    "Placement",
    "SafetyViolation",
    "assert_single_instance",
    "placements",
    "settle",
]

_PENDING = ("migrating", "incoming", "paused (awaiting destination)", "creating")


class SafetyViolation(AssertionError):
    """An invariant of the trust model does not hold (a fork, a rollback, a lost write)."""


@dataclass(frozen=True, slots=True)
class Placement:
    """One host's view of the VM: its API state and what the VM process itself says."""

    host: str
    api_state: str | None  # None: the host API does not list the VM
    process_state: str | None  # None: no VM process answers on this host
    console_lines: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def executing(self) -> bool:
        return self.process_state == "running"


def _process_info(host: HostProcess, name: str) -> dict[str, Any] | None:
    sock = host.vm_dir(name) / "control.sock"
    if not sock.exists() or host.vm_pid(name) is None:
        return None
    try:
        endpoint = connect_unix(str(sock), name="invariants", timeout=5.0)
    except (OSError, CvmError):
        return None
    try:
        return dict(endpoint.call("info", timeout=5.0)[0])
    except CvmError:
        return None
    finally:
        endpoint.close()


def placements(hosts: Sequence[HostProcess], name: str) -> list[Placement]:
    out = []
    for host in hosts:
        api_state = None
        if host.running():
            with contextlib.suppress(ApiError, httpx.HTTPError, OSError, ValueError, CvmError):
                api_state = host.vms().get(name, {}).get("state")
        info = _process_info(host, name)
        state = None if info is None else str(info.get("state"))
        lines = 0 if info is None else int(info.get("console_lines", 0))
        out.append(Placement(host.name, api_state, state, lines, info or {}))
    return out


def assert_single_instance(hosts: Sequence[HostProcess], name: str, *, window: float = 0.3) -> Placement | None:
    """At most one executing instance, by every account; returns it (None: the VM is stopped everywhere)."""
    first = placements(hosts, name)
    running = [p for p in first if p.executing]
    if len(running) > 1:
        raise SafetyViolation(f"VM {name!r} executes on {[p.host for p in running]}: {first}")
    api_running = [p for p in first if p.api_state == "running"]
    if len(api_running) > 1:
        raise SafetyViolation(f"VM {name!r} reported running by {[p.host for p in api_running]}")
    # Watch the consoles: a VM that executes prints heartbeats; two advancing consoles are two instances.
    time.sleep(window)
    second = {p.host: p for p in placements(hosts, name)}
    advancing = [p.host for p in first if p.info and second[p.host].console_lines > p.console_lines]
    if len(advancing) > 1:
        raise SafetyViolation(f"VM {name!r} prints on {advancing} at the same time")
    return running[0] if running else None


def settle(hosts: Sequence[HostProcess], name: str, timeout: float = 60.0) -> Placement:
    """Wait until the VM runs on exactly one host and no host holds a half-done migration of it."""
    deadline = time.monotonic() + timeout
    last: list[Placement] = []
    while time.monotonic() < deadline:
        last = placements(hosts, name)
        running = [p for p in last if p.executing and p.api_state == "running"]
        pending = [p for p in last if p.api_state in _PENDING]
        if len(running) == 1 and not pending and sum(p.executing for p in last) == 1:
            return running[0]
        time.sleep(0.1)
    raise SafetyViolation(f"VM {name!r} did not settle on one host within {timeout:.0f} s: {last}")


class MemdirtyWatch:
    """Checks memdirty heartbeats against the model; remembers the highest write count seen."""

    def __init__(self, dirty_mib: int, seed: int = 1) -> None:
        self.dirty_mib = dirty_mib
        self.seed = seed
        self._model = MemdirtyModel(dirty_mib, seed)
        self.writes = 0
        self.checks = 0

    def check(self, host: HostProcess, name: str, *, timeout: float = 10.0) -> int:
        """Wait (bounded) for a heartbeat newer than the last check on ``host``, verify it, return its writes."""
        deadline = time.monotonic() + timeout
        while True:
            lines = host.api("GET", f"/v1/vms/{name}/console")["lines"]
            beats = [b for b in (parse_heartbeat(str(line)) for line in lines) if b is not None]
            if beats and (beats[-1][1] > self.writes or self.checks == 0):
                break
            if time.monotonic() > deadline:
                raise SafetyViolation(f"VM {name!r} on {host.name}: no new heartbeat within {timeout:.0f} s")
            time.sleep(0.05)
        _seq, writes, csum = beats[-1]
        if writes < self.writes:
            raise SafetyViolation(f"VM {name!r} rolled back: {writes} writes after {self.writes} were seen")
        expected = self._model.checksum_at(writes)
        if csum != expected:
            raise SafetyViolation(
                f"VM {name!r} on {host.name}: checksum {csum:08x} after {writes} writes, the model says {expected:08x}"
            )
        self.writes = writes
        self.checks += 1
        return writes


class KvLedger:
    """A client writing unique keys through the host API of whichever host runs the VM; keeps what was acked."""

    def __init__(self, hosts: Sequence[HostProcess], name: str, seed: int = 0) -> None:
        self.hosts = list(hosts)
        self.name = name
        self.rng = random.Random(seed)
        self.acked: dict[str, str] = {}
        self.refused = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._n = 0

    def put(self) -> bool:
        key = f"k{self._n}"
        value = self.rng.randbytes(8).hex()
        self._n += 1
        for host in self.hosts:
            if not host.running():
                continue
            try:
                body = {"op": "put", "key": key, "value": value}
                result = host.api("POST", f"/v1/vms/{self.name}/kv", body, timeout=10)
            except (ApiError, httpx.HTTPError, OSError, ValueError):
                continue
            if result.get("status") == "OK":
                self.acked[key] = value
                return True
        self.refused += 1
        return False

    def start(self) -> KvLedger:
        def run() -> None:
            while not self._stop.is_set():
                if not self.put():
                    self._stop.wait(0.02)

        self._thread = threading.Thread(target=run, name="kv-ledger", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def verify(self, host: HostProcess) -> int:
        """Every acknowledged PUT is readable on ``host`` with its value; returns how many were checked."""
        lost = []
        for key, value in self.acked.items():
            got = host.api("POST", f"/v1/vms/{self.name}/kv", {"op": "get", "key": key})
            if got.get("status") != "OK" or got.get("value") != value:
                lost.append((key, value, got))
        if lost:
            what = f"{len(lost)} of {len(self.acked)} acknowledged writes"
            raise SafetyViolation(f"{what} lost on {host.name}: {lost[:3]}")
        return len(self.acked)
