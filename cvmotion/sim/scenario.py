"""sim layer: the fleet a simulation builds — hosts, tenants, their policies and VMs — from one seed.

These are the scenario's assumptions (stated, not measured): hosts of 128 vCPUs / 1 TiB in fault domains
(``fd0``…), each pool spread over every fault domain; VM sizes weighted towards the small end of the
DCasv5/ECasv5 catalogue; resource groups of three kinds — open, restricted to two pools by
``allowed-host-pools``, and ``deny-confidential-live-migration`` — with 70 % of VMs opted in where policy
permits; guests that touch 5-35 % of their memory and dirty it quietly, busily or heavily.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from cvmotion.control.resources import host_vm_name, vm_id
from cvmotion.sim.distributions import Workload
from cvmotion.sim.hosts import SimHost
from cvmotion.sim.ledger import Intent

__all__ = ["GroupKind", "GroupPlan", "Scenario", "VmPlan", "build_scenario"]

SUBSCRIPTION = "sim"
HOST_VCPUS, HOST_MEMORY_GIB = 128, 1024
POOLS = ("pool-a", "pool-b", "pool-c", "pool-d")
SIZES = (  # (size, weight)
    ("Standard_DC2as_v5", 35), ("Standard_DC4as_v5", 25), ("Standard_DC8as_v5", 20), ("Standard_DC16as_v5", 10),
    ("Standard_EC8as_v5", 5), ("Standard_DC32as_v5", 4), ("Standard_EC64as_v5", 1),
)  # fmt: skip
OPT_IN_SHARE = 0.7
VMS_PER_GROUP = 100


class GroupKind(enum.Enum):
    OPEN = "open"
    POOLS = "pools"  # allowed-host-pools: two pools
    NO_LIVE = "no-live-migration"  # deny-confidential-live-migration


@dataclass(frozen=True, slots=True)
class GroupPlan:
    name: str
    kind: GroupKind
    pools: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class VmPlan:
    name: str
    group: GroupPlan
    size: str
    opted_in: bool
    workload_seed: int

    @property
    def host_name(self) -> str:
        """The VM's name on its host (the controller's rule), how the simulated hosts know it."""
        return host_vm_name(vm_id(SUBSCRIPTION, self.group.name, self.name), self.name)

    @property
    def intent(self) -> Intent:
        pools = frozenset(self.group.pools) if self.group.kind is GroupKind.POOLS else None
        return Intent(opted_in=self.opted_in, pools=pools, live_denied=self.group.kind is GroupKind.NO_LIVE)


@dataclass(frozen=True, slots=True)
class Scenario:
    hosts: list[SimHost]
    groups: list[GroupPlan]
    vms: list[VmPlan]
    fault_domains: list[str]
    by_host_name: dict[str, VmPlan]

    def workload(self, host_name: str, memory_gib: float) -> Workload:
        """The guest behind a VM the controller creates (seeded per VM; unknown VMs get a quiet one)."""
        plan = self.by_host_name.get(host_name)
        rng = random.Random(plan.workload_seed if plan else 0)
        populated = memory_gib * rng.uniform(0.05, 0.35)
        kind = rng.random()
        if kind < 0.6:
            dirty = rng.uniform(1.0, 20.0)
        elif kind < 0.9:
            dirty = rng.uniform(20.0, 120.0)
        else:
            dirty = rng.uniform(150.0, 600.0)
        hot = min(populated * 1024.0, rng.uniform(16.0, 1024.0))
        return Workload(memory_gib=memory_gib, populated_gib=populated, hot_mib=hot, dirty_mib_s=dirty)


def fault_domain_count(hosts: int) -> int:
    return max(2, min(10, hosts // 10))


def build_scenario(hosts: int, vms: int, seed: int) -> Scenario:
    rng = random.Random(seed)
    domains = [f"fd{i}" for i in range(fault_domain_count(hosts))]
    fleet = [
        SimHost(
            name=f"sim-{i:04d}",
            pool=POOLS[(i // len(domains)) % len(POOLS)],
            zone=domains[i % len(domains)],
            vcpus=HOST_VCPUS,
            memory_gib=HOST_MEMORY_GIB,
        )
        for i in range(hosts)
    ]
    groups = []
    for g in range(max(3, -(-vms // VMS_PER_GROUP))):
        kind = (GroupKind.OPEN, GroupKind.POOLS, GroupKind.NO_LIVE)[g % 3] if g < 3 else _kind(rng)
        pools = tuple(sorted(rng.sample(POOLS, 2))) if kind is GroupKind.POOLS else ()
        groups.append(GroupPlan(f"rg{g:03d}", kind, pools))
    names, weights = zip(*SIZES, strict=True)
    plans = []
    for i in range(vms):
        group = groups[i % len(groups)]
        opted = group.kind is not GroupKind.NO_LIVE and rng.random() < OPT_IN_SHARE
        plans.append(VmPlan(f"vm{i:05d}", group, rng.choices(names, weights)[0], opted, rng.randrange(1 << 30)))
    return Scenario(fleet, groups, plans, domains, {vm.host_name: vm for vm in plans})


def _kind(rng: random.Random) -> GroupKind:
    roll = rng.random()
    return GroupKind.OPEN if roll < 0.6 else GroupKind.POOLS if roll < 0.85 else GroupKind.NO_LIVE
