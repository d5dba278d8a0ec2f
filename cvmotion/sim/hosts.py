"""sim layer: the simulated hosts — VMs, migrations, in-place updates and Scheduled Events, in memory.

Each ``SimHost`` keeps what a host daemon keeps for the subset of the host API the controller uses; the
``SimFleet`` holds them all under one lock and moves them through time with its ``Scheduler``.  Every
instant a VM starts, stops, pauses or resumes somewhere is told to the ``Ledger`` (the ground truth).

What the simulation leaves out, on purpose: the migration agents' own policy check (a real destination
outside the VM's bound pools refuses the move; here it is accepted, so a controller that broke a policy
shows up as a violation instead of a refused move), capacity on the host (the controller's to keep), and
the guest's data (the migration protocol's tests cover it).
"""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cvmotion.sim.clock import VirtualClock
from cvmotion.sim.distributions import (
    DOWNTIME_LIMIT_MS,
    LiveMigration,
    Workload,
    draw_inplace_pause_ms,
    draw_live_migration,
)
from cvmotion.sim.ledger import Ledger, Method
from cvmotion.sim.scheduler import Scheduler

__all__ = ["SimError", "SimFleet", "SimHost", "SimMigration", "SimVm"]

TCB = 0x1B_00_00_00_00_00_00_04
WorkloadFor = Callable[[str, float], Workload]


class SimError(Exception):
    """A refusal with the HTTP status the host API gives it."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


@dataclass
class SimVm:
    name: str
    size: str
    vcpus: int
    memory_gib: float
    workload: Workload
    host: str
    state: str = "running"  # running | paused | migrating
    attestations: int = 1
    attested_at: float = 0.0  # virtual second of the latest attestation
    events: dict[str, Any] | None = None  # the Scheduled Events document the controller PUT
    start_requests: list[dict[str, str]] = field(default_factory=list)

    def view(self, chip_id: str) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "host": self.host,
            "size": self.size,
            "vcpus": self.vcpus,
            "memory_gib": self.memory_gib,
            "chip_id": chip_id,
        }


@dataclass
class SimMigration:
    id: str
    vm: str
    source: str
    dest: str
    started: float
    draw: LiveMigration
    status: str = "active"  # active | device (switchover) | completed | failed | cancelled
    error: str = ""

    def view(self) -> dict[str, Any]:
        done = self.status == "completed"
        out: dict[str, Any] = {
            "status": self.status,
            "total-time": round(self.draw.total_ms) if done else None,
            "downtime": round(self.draw.downtime_ms) if done else None,
            "setup-time": round(self.draw.setup_ms),
            "ram": {"transferred": int(self.draw.transferred_mib * 2**20), "dirty-sync-count": self.draw.rounds},
            "x-cvmotion": {"id": self.id, "vm": self.vm, "source": self.source, "destination": self.dest},
        }
        if self.error:
            out["error-desc"] = self.error
        return out


@dataclass
class SimMaintenance:
    id: str
    kind: str
    started: float
    status: str = "InProgress"
    ended: float | None = None
    vms: list[dict[str, Any]] = field(default_factory=list)

    def view(self, iso: Callable[[float], str]) -> dict[str, Any]:
        done = self.status != "InProgress"
        return {
            "id": self.id,
            "kind": self.kind,
            "status": self.status,
            "startedAt": iso(self.started),
            "endedAt": iso(self.ended) if self.ended is not None else None,
            "platformRestarted": done,
            "daemonRestarted": done,
            "vms": self.vms if done else [],
            "error": None,
        }


@dataclass
class SimHost:
    name: str
    pool: str
    zone: str
    vcpus: int
    memory_gib: int
    product: str = "Genoa"
    down: bool = False
    vms: dict[str, SimVm] = field(default_factory=dict)
    migrations: dict[str, SimMigration] = field(default_factory=dict)
    maintenance: dict[str, SimMaintenance] = field(default_factory=dict)

    @property
    def chip_id(self) -> str:
        return uuid.uuid5(uuid.NAMESPACE_DNS, f"cvmotion-sim-{self.name}").hex * 4

    def registration(self, api_url: str) -> dict[str, Any]:
        return {
            "name": self.name, "chip_id": self.chip_id, "product": self.product, "tcb": TCB,
            "tcb_text": "bl=4 tee=0 snp=27 ucode=0", "pool": self.pool, "region": "sim", "zone": self.zone,
            "vcpus": self.vcpus, "memory_gib": self.memory_gib, "api_url": api_url,
            "migration_address": "127.0.0.1:9", "vms": self.running(),
        }  # fmt: skip

    def running(self) -> list[str]:
        return sorted(self.vms)


class SimFleet:
    """Every simulated host, the ground truth and the event queue; all state changes under ``lock``."""

    def __init__(self, clock: VirtualClock, seed: int, workload_for: WorkloadFor, epoch: float = 0.0) -> None:
        self.clock = clock
        self.lock = threading.RLock()
        self.scheduler = Scheduler(clock, self.lock)
        self.ledger = Ledger()
        self.hosts: dict[str, SimHost] = {}
        self.rng = random.Random(seed)
        self.workload_for = workload_for
        self.epoch = epoch  # wall-clock UNIX time of virtual second 0, for timestamps in answers
        self.approve_early = 0.5  # share of Scheduled Events a guest approves before NotBefore
        self.api_prefix = ""  # the URL prefix hosts are reached under; ``/h/<name>`` follows it

    def add(self, host: SimHost) -> None:
        self.hosts[host.name] = host
        self.ledger.host_pool(host.name, host.pool)

    def url_of(self, host: str) -> str:
        return f"{self.api_prefix}/h/{host}"

    def host(self, name: str) -> SimHost:
        found = self.hosts.get(name)
        if found is None:
            raise SimError(404, "NotFound", f"no simulated host {name!r}")
        return found

    def _host_by_url(self, url: str) -> SimHost:
        name = url.rstrip("/").rsplit("/h/", 1)[-1] if "/h/" in url else ""
        host = self.hosts.get(name)
        if host is None:
            raise SimError(400, "UsageError", f"destination {url!r} is not a host of this fleet")
        return host

    def iso(self, virtual: float) -> str:
        from datetime import UTC, datetime

        return datetime.fromtimestamp(self.epoch + virtual, UTC).isoformat()

    # -- VMs -------------------------------------------------------------------------------------

    def create_vm(self, host: SimHost, body: dict[str, Any]) -> dict[str, Any]:
        from cvmotion.abi.sku import find_sku

        name = str(body.get("name", ""))
        if not name:
            raise SimError(400, "UsageError", "a VM needs a name")
        if name in host.vms:
            raise SimError(409, "Conflict", f"VM {name} exists on {host.name}")
        sku = find_sku(str(body.get("size", "Standard_DC2as_v5")))
        vm = SimVm(name, sku.name, sku.vcpus, sku.memory_gib, self.workload_for(name, sku.memory_gib), host.name)
        vm.attested_at = self.clock.now()
        host.vms[name] = vm
        self.ledger.start(self.clock.now(), name, host.name, Method.CREATE)
        return vm.view(host.chip_id)

    def get_vm(self, host: SimHost, name: str) -> SimVm:
        vm = host.vms.get(name)
        if vm is None:
            raise SimError(404, "NotFound", f"no VM {name} on {host.name}")
        return vm

    def delete_vm(self, host: SimHost, name: str) -> dict[str, Any]:
        vm = self.get_vm(host, name)
        if vm.state == "migrating":
            raise SimError(409, "Conflict", f"VM {name} is migrating")
        del host.vms[name]
        self.ledger.stop(self.clock.now(), name, host.name)
        return {"deleted": name}

    def attestation(self, host: SimHost, name: str) -> dict[str, Any]:
        vm = self.get_vm(host, name)
        # The VM process's AttestationInfo shape (vmd.protocol), without a signed token behind it.
        return {
            "token": "",
            "jti": f"{name}.{vm.attestations}",
            "chip_id": host.chip_id,
            "tcb": "bl=4 tee=0 snp=27 ucode=0",
            "platform": "simulated",
            "issued_at": self.epoch + vm.attested_at,
            "reason": "launch" if vm.attestations == 1 else "after-move",
        }

    # -- live migration --------------------------------------------------------------------------

    def migrate(self, src: SimHost, name: str, body: dict[str, Any]) -> dict[str, Any]:
        vm = self.get_vm(src, name)
        if vm.state != "running":
            raise SimError(409, "Conflict", f"VM {name} is {vm.state}")
        dest = self._host_by_url(str(body.get("destination", "")))
        if dest.name == src.name:
            raise SimError(400, "UsageError", "the destination is the source")
        if dest.down:
            raise SimError(400, "UsageError", f"destination {dest.name} is unreachable")
        if name in dest.vms:
            raise SimError(409, "Conflict", f"{dest.name} already holds a VM {name}")
        limit = float(body.get("downtime_limit_ms") or DOWNTIME_LIMIT_MS)
        now = self.clock.now()
        mig = SimMigration(
            uuid.uuid4().hex[:12], name, src.name, dest.name, now, draw_live_migration(self.rng, vm.workload, limit)
        )
        src.migrations[mig.id] = mig
        vm.state = "migrating"
        switch_at = now + (mig.draw.total_ms - mig.draw.downtime_ms) / 1000.0
        self.scheduler.at(switch_at, lambda at: self._switchover(mig, at))
        self.scheduler.at(now + mig.draw.total_ms / 1000.0, lambda at: self._commit(mig, at))
        return {"migration": mig.id, **mig.view()}

    def _switchover(self, mig: SimMigration, at: float) -> None:
        src = self.hosts[mig.source]
        if mig.status != "active":
            return
        if src.down or self.hosts[mig.dest].down:
            self._fail(mig, "a host of the migration went down during pre-copy")
            return
        mig.status = "device"
        src.vms[mig.vm].state = "paused"
        self.ledger.pause(at, mig.vm, src.name)

    def _commit(self, mig: SimMigration, at: float) -> None:
        if mig.status != "device":
            return
        src, dest = self.hosts[mig.source], self.hosts[mig.dest]
        vm = src.vms.pop(mig.vm)
        self.ledger.stop(at, mig.vm, src.name)
        vm.host, vm.state, vm.attestations, vm.attested_at = dest.name, "running", vm.attestations + 1, at
        dest.vms[vm.name] = vm
        self.ledger.start(at, vm.name, dest.name, Method.LIVE)
        mig.status = "completed"

    def _fail(self, mig: SimMigration, error: str, status: str = "failed") -> None:
        mig.status, mig.error = status, error
        vm = self.hosts[mig.source].vms.get(mig.vm)
        if vm is not None:
            vm.state = "running"

    def cancel(self, src: SimHost, mig_id: str) -> dict[str, Any]:
        mig = self.migration(src, mig_id)
        if mig.status == "active":
            self._fail(mig, "cancelled by request", "cancelled")
        return mig.view()

    def migration(self, src: SimHost, mig_id: str) -> SimMigration:
        mig = src.migrations.get(mig_id)
        if mig is None:
            raise SimError(404, "NotFound", f"no migration {mig_id} on {src.name}")
        return mig

    # -- in-place (memory-preserving) update -----------------------------------------------------

    def start_maintenance(self, host: SimHost, body: dict[str, Any]) -> SimMaintenance:
        mid, kind = str(body.get("id", "")), str(body.get("kind", ""))
        if not mid or kind != "MemoryPreservingUpdate":
            raise SimError(400, "UsageError", "maintenance needs an id and kind MemoryPreservingUpdate")
        if mid in host.maintenance:
            return host.maintenance[mid]
        if any(m.status == "InProgress" for m in host.maintenance.values()):
            raise SimError(409, "Conflict", f"{host.name} runs another maintenance")
        now = self.clock.now()
        record = SimMaintenance(mid, kind, now)
        host.maintenance[mid] = record
        end = now
        for vm in list(host.vms.values()):
            if vm.state != "running":
                record.vms.append(self._maint_vm(vm.name, None, "Skipped", f"the VM is {vm.state}"))
                continue
            pause_ms = draw_inplace_pause_ms(self.rng)
            vm.state = "paused"
            self.ledger.pause(now, vm.name, host.name)
            end = max(end, now + pause_ms / 1000.0)
            self.scheduler.at(now + pause_ms / 1000.0, self._resumer(host, record, vm, pause_ms))
        self.scheduler.at(end, lambda at: self._maintenance_done(record, at))
        return record

    def _resumer(self, host: SimHost, record: SimMaintenance, vm: SimVm, pause_ms: float) -> Callable[[float], None]:
        return lambda at: self._resume(host, record, vm, pause_ms, at)

    @staticmethod
    def _maint_vm(name: str, pause_ms: float | None, outcome: str, reason: str) -> dict[str, Any]:
        pause = round(pause_ms, 1) if pause_ms is not None else None
        return {"name": name, "pauseMs": pause, "reattested": pause is not None, "outcome": outcome, "reason": reason}

    def _resume(self, host: SimHost, record: SimMaintenance, vm: SimVm, pause_ms: float, at: float) -> None:
        vm.state = "running"
        vm.attestations += 1  # the platform process restarted: the VM re-attests after resume
        vm.attested_at = at
        self.ledger.resume(at, vm.name, host.name, Method.INPLACE)
        record.vms.append(self._maint_vm(vm.name, pause_ms, "Succeeded", ""))

    def _maintenance_done(self, record: SimMaintenance, at: float) -> None:
        record.status, record.ended = "Succeeded", at

    # -- Scheduled Events ------------------------------------------------------------------------

    def put_events(self, host: SimHost, name: str, doc: Any) -> dict[str, Any]:
        vm = self.get_vm(host, name)
        if not isinstance(doc, dict) or not isinstance(doc.get("DocumentIncarnation"), int):
            raise SimError(400, "UsageError", "a Scheduled Events document needs DocumentIncarnation and Events")
        events = doc.get("Events")
        if not isinstance(events, list):
            raise SimError(400, "UsageError", "Events must be a list")
        current = vm.events["DocumentIncarnation"] if vm.events else -1
        if doc["DocumentIncarnation"] < current:
            raise SimError(409, "Conflict", f"incarnation {doc['DocumentIncarnation']} is older than {current}")
        vm.events = doc
        asked = {r["EventId"] for r in vm.start_requests}
        for event in events:
            eid = str(event.get("EventId", "")) if isinstance(event, dict) else ""
            scheduled = eid and eid not in asked and event.get("EventStatus") == "Scheduled"
            if scheduled and self.rng.random() < self.approve_early:  # the guest approves early (StartRequests)
                self.scheduler.at(self.clock.now() + self.rng.uniform(1.0, 10.0), self._approver(vm, eid))
        return self.events(host, name)

    @staticmethod
    def _approver(vm: SimVm, event_id: str) -> Callable[[float], None]:
        return lambda _at: vm.start_requests.append({"EventId": event_id})

    def events(self, host: SimHost, name: str) -> dict[str, Any]:
        vm = self.get_vm(host, name)
        return {
            "document": vm.events or {"DocumentIncarnation": 0, "Events": []},
            "startRequests": list(vm.start_requests),
        }

    # -- failures --------------------------------------------------------------------------------

    def fail_host(self, host: SimHost, at: float, seconds: float) -> None:
        """From ``at``, for ``seconds`` (virtual), the host's daemon answers nothing; its VMs keep running."""

        def down(when: float) -> None:
            host.down = True
            for mig in list(host.migrations.values()):
                if mig.status == "active":
                    self._fail(mig, f"source {host.name} went down during pre-copy")
            for other in self.hosts.values():
                for mig in other.migrations.values():
                    if mig.dest == host.name and mig.status == "active":
                        self._fail(mig, f"destination {host.name} went down during pre-copy")

        def up(_when: float) -> None:
            host.down = False

        self.scheduler.at(at, down)
        self.scheduler.at(at + seconds, up)

    def quiet(self) -> bool:
        """No migration or in-place update in flight anywhere."""
        with self.lock:
            for host in self.hosts.values():
                if any(m.status in ("active", "device") for m in host.migrations.values()):
                    return False
                if any(m.status == "InProgress" for m in host.maintenance.values()):
                    return False
            return True
