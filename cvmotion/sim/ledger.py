"""sim layer: the ground truth — which VM runs where at every instant, kept by the simulated hosts.

The hosts call the ledger at the instant (virtual time) a VM starts, stops, pauses or resumes on them, and
the ledger checks, then and there, what a controller must never cause:

* two copies: an instance of a VM appears on a host while another host holds one (running or paused);
* a policy violation: a VM lands on a host whose pool its tenant's policy does not allow, or is
  live-migrated although its owner did not opt in or a policy denies live migration — judged from the
  tenant's intent the scenario recorded when it created the VM (``Intent``), never from the controller;
* lost: at the end, a VM created once that no host holds.

It also measures each blackout (the VM running nowhere: the switchover of a live migration, the pause of an
in-place update, the gap of a redeploy) from the instants themselves.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field

__all__ = ["Blackout", "Intent", "Ledger", "Method", "Verdict", "Violation"]


class Method(enum.Enum):
    CREATE = "Create"
    LIVE = "LiveMigration"
    INPLACE = "MemoryPreservingUpdate"
    REDEPLOY = "Redeploy"


@dataclass(frozen=True, slots=True)
class Intent:
    """What the VM's owner and organisation asked for (the scenario's record, not the controller's)."""

    opted_in: bool
    pools: frozenset[str] | None = None  # None: any pool
    live_denied: bool = False


@dataclass(frozen=True, slots=True)
class Violation:
    at: float
    vm: str
    host: str
    kind: str  # "policy" | "two-copies"
    detail: str


@dataclass(frozen=True, slots=True)
class Blackout:
    at: float  # virtual second it ended
    vm: str
    ms: float
    method: Method


@dataclass
class _Vm:
    intent: Intent
    hosts: dict[str, bool] = field(default_factory=dict)  # host -> running (False: paused)
    dark_since: float | None = None
    started: bool = False


@dataclass(frozen=True, slots=True)
class Verdict:
    vms: int
    policy_violations: int
    two_copies: int
    lost: list[str]
    violations: list[Violation]


class Ledger:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._vms: dict[str, _Vm] = {}
        self._pools: dict[str, str] = {}
        self.violations: list[Violation] = []
        self.blackouts: list[Blackout] = []
        self.moves: list[tuple[float, Method]] = []  # (virtual second, how) of every completed move or update

    def host_pool(self, host: str, pool: str) -> None:
        self._pools[host] = pool

    def intend(self, vm: str, intent: Intent) -> None:
        with self._lock:
            self._vms.setdefault(vm, _Vm(intent))

    def _vm(self, vm: str) -> _Vm:
        # A VM nobody declared (created behind the scenario's back) is held to the strictest intent.
        return self._vms.setdefault(vm, _Vm(Intent(opted_in=False, pools=frozenset(), live_denied=True)))

    def start(self, at: float, vm: str, host: str, method: Method) -> None:
        """An instance of ``vm`` runs on ``host`` from ``at`` (created, or arrived by ``method``)."""
        with self._lock:
            rec = self._vm(vm)
            if method is Method.CREATE and rec.started:
                method = Method.REDEPLOY  # a fresh start of a VM that ran before: it was redeployed
            others = sorted(h for h in rec.hosts if h != host)
            if others:
                self._flag(at, vm, host, "two-copies", f"already on {', '.join(others)}")
            pool = self._pools.get(host, "")
            if rec.intent.pools is not None and pool not in rec.intent.pools:
                allowed = sorted(rec.intent.pools)
                self._flag(at, vm, host, "policy", f"{method.value} onto pool {pool!r}, allowed {allowed}")
            if method is Method.LIVE and not rec.intent.opted_in:
                self._flag(at, vm, host, "policy", "live-migrated without the owner's opt-in")
            if method is Method.LIVE and rec.intent.live_denied:
                self._flag(at, vm, host, "policy", "live-migrated although a policy denies it")
            rec.hosts[host] = True
            rec.started = True
            self._lit(at, vm, rec, method)

    def stop(self, at: float, vm: str, host: str) -> None:
        """The instance on ``host`` is gone (moved away, deleted, or discarded)."""
        with self._lock:
            rec = self._vm(vm)
            rec.hosts.pop(host, None)
            self._dark(at, rec)

    def pause(self, at: float, vm: str, host: str) -> None:
        with self._lock:
            rec = self._vm(vm)
            if host in rec.hosts:
                rec.hosts[host] = False
                self._dark(at, rec)

    def resume(self, at: float, vm: str, host: str, method: Method) -> None:
        with self._lock:
            rec = self._vm(vm)
            if host in rec.hosts:
                rec.hosts[host] = True
                self._lit(at, vm, rec, method)

    def _dark(self, at: float, rec: _Vm) -> None:
        if rec.dark_since is None and not any(rec.hosts.values()):
            rec.dark_since = at

    def _lit(self, at: float, vm: str, rec: _Vm, method: Method) -> None:
        if method is Method.CREATE and rec.dark_since is None:
            return
        if rec.dark_since is not None:
            self.blackouts.append(Blackout(at, vm, (at - rec.dark_since) * 1000.0, method))
            rec.dark_since = None
        self.moves.append((at, method))

    def _flag(self, at: float, vm: str, host: str, kind: str, detail: str) -> None:
        self.violations.append(Violation(at, vm, host, kind, detail))

    def where(self, vm: str) -> dict[str, bool]:
        with self._lock:
            rec = self._vms.get(vm)
            return dict(rec.hosts) if rec else {}

    def started(self) -> int:
        """How many VMs have run somewhere (created through the controller and started by a host)."""
        with self._lock:
            return sum(rec.started for rec in self._vms.values())

    def verdict(self) -> Verdict:
        """The invariants over everything seen so far (call it when the fleet is quiet)."""
        with self._lock:
            lost = sorted(name for name, rec in self._vms.items() if rec.started and not rec.hosts)
            # A created VM that ends on two hosts is counted even if no single start saw it (belt and braces).
            doubled = [name for name, rec in self._vms.items() if len(rec.hosts) > 1]
            flagged = {v.vm for v in self.violations if v.kind == "two-copies"}
            return Verdict(
                vms=len(self._vms),
                policy_violations=sum(v.kind == "policy" for v in self.violations),
                two_copies=len(flagged | set(doubled)),
                lost=lost,
                violations=list(self.violations),
            )
