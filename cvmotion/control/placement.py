"""control layer: the scheduler — filter hosts that can take a VM, then spread (Nova's filter + weigh).

Filters, each with the reason it gives when it removes a host: availability, cordon, pinned host, product,
minimum TCB, the policy's allowed pools (a callable the caller builds from the assignments in scope),
free vCPUs and memory.  Weighing spreads VMs: fewest VMs first, then most free memory, then the name,
so the choice is deterministic for the same inventory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cvmotion.control.resources import HostState

__all__ = ["Candidate", "Demand", "NoHost", "choose_host", "rank_hosts", "rejects"]


@dataclass(frozen=True, slots=True)
class Candidate:
    name: str
    pool: str
    product: str
    tcb: int
    state: HostState
    vcpus: int
    memory_gib: int
    used_vcpus: int
    used_memory_gib: int
    vm_count: int
    cordoned: bool = False  # under maintenance: never a target
    chip_id: str = ""  # recorded as the VM's attestation chip when it lands here


@dataclass(frozen=True, slots=True)
class Demand:
    vcpus: int
    memory_gib: int
    product: str | None = None
    minimum_tcb: int | None = None
    pinned_host: str | None = None
    exclude: str | None = None  # the source of a move


class NoHost(Exception):
    """No host passed every filter; ``reasons`` says, per host, the first filter it failed."""

    def __init__(self, reasons: dict[str, str]) -> None:
        detail = "; ".join(f"{h}: {r}" for h, r in sorted(reasons.items())) or "no hosts are registered"
        super().__init__(f"no host can take the VM ({detail})")
        self.reasons = reasons


def _reject(host: Candidate, demand: Demand, pool_allowed: Callable[[str], bool]) -> str | None:
    if demand.pinned_host is not None and host.name != demand.pinned_host:
        return "not the pinned host"
    if demand.exclude is not None and host.name == demand.exclude:
        return "the VM is already there"
    if host.state is not HostState.AVAILABLE:
        return f"host is {host.state.value}"
    if host.cordoned:
        return "host is cordoned (maintenance)"
    if demand.product is not None and host.product != demand.product:
        return f"product {host.product}, the VM needs {demand.product}"
    if demand.minimum_tcb is not None and host.tcb < demand.minimum_tcb:
        return f"TCB {host.tcb:#x} is below the minimum {demand.minimum_tcb:#x}"
    if not pool_allowed(host.pool):
        return f"pool {host.pool!r} is not allowed by policy"
    if host.vcpus - host.used_vcpus < demand.vcpus:
        return f"{host.vcpus - host.used_vcpus} vCPUs free, {demand.vcpus} needed"
    if host.memory_gib - host.used_memory_gib < demand.memory_gib:
        return f"{host.memory_gib - host.used_memory_gib} GiB free, {demand.memory_gib} needed"
    return None


def rank_hosts(hosts: Sequence[Candidate], demand: Demand, pool_allowed: Callable[[str], bool]) -> list[Candidate]:
    """The hosts that can take the VM, best first (fewest VMs, then most free memory, then the name).

    Raises:
        NoHost: every host failed a filter (the reasons name each).
    """
    reasons: dict[str, str] = {}
    fit: list[Candidate] = []
    for host in hosts:
        reason = _reject(host, demand, pool_allowed)
        if reason is None:
            fit.append(host)
        else:
            reasons[host.name] = reason
    if not fit:
        raise NoHost(reasons)
    return sorted(fit, key=lambda h: (h.vm_count, -(h.memory_gib - h.used_memory_gib), h.name))


def rejects(host: Candidate, demand: Demand, pool_allowed: Callable[[str], bool]) -> str | None:
    """Why ``host`` cannot take the VM (``None``: it can) — the check repeated once the host is locked."""
    return _reject(host, demand, pool_allowed)


def choose_host(hosts: Sequence[Candidate], demand: Demand, pool_allowed: Callable[[str], bool]) -> Candidate:
    """The host the VM goes to.

    Raises:
        NoHost: every host failed a filter (the reasons name each).
    """
    return rank_hosts(hosts, demand, pool_allowed)[0]
