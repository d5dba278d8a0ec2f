"""host layer: the daemon's record of each VM (``VmRecord``, its ``VmState``) and where it is persisted.

``<data-dir>/vms/<name>/meta.json`` holds what the daemon knows of a VM beyond its spec (``vm.json``): guest
handle, measurement, policies, state, migrations, a pending recovery. It is written atomically with fsync
(``cvmotion.files``), so a daemon killed at any point finds either the old record or the new one. The
firmware, not this record, is the truth about a migration: recovery asks the secure processor and uses the
record only to know whom to ask.

::

    CREATING ──launch──► RUNNING ◄──────────── resumed (abort, token) ─────────┐
                            │ ▲                                                 │
                  migrate   │ │ pause/resume (VM process)                        │
                            ▼ │                                                 │
                        MIGRATING ──start token, no verdict──► AWAITING_DESTINATION
                            │                                          │ commit receipt
                            └──────────── commit receipt ──────────────┴──► MIGRATED
    INCOMING ──commit──► RUNNING          any ──delete──► DELETED           VM process gone ──► LOST
"""

from __future__ import annotations

import enum
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvmotion.files import write_json
from cvmotion.vmd.client import VmClient
from cvmotion.vmd.protocol import VmSpec

__all__ = ["GONE", "UNSETTLED", "VmRecord", "VmState", "VmStore"]


class VmState(enum.StrEnum):
    """A VM as this host sees it; the values are what the host API prints."""

    CREATING = "creating"
    CREATED = "created"  # the VM process's own word: booted, vCPUs not started
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    MIGRATING = "migrating"
    AWAITING_DESTINATION = "paused (awaiting destination)"
    MIGRATED = "migrated"
    INCOMING = "incoming"
    DELETED = "deleted"
    LOST = "lost"  # the record says it runs here, but its VM process is gone

    @classmethod
    def parse(cls, value: object) -> VmState:
        """A state read back from disk or a VM process; anything unknown is LOST (never guessed as running)."""
        try:
            return cls(str(value))
        except ValueError:
            return cls.LOST


GONE = frozenset({VmState.MIGRATED, VmState.DELETED})  # records kept for the record only
# A migration in flight: only its outcome says whether this copy of the guest is the one that lives on.
UNSETTLED = frozenset({VmState.MIGRATING, VmState.AWAITING_DESTINATION, VmState.INCOMING})


@dataclass
class VmRecord:
    """What the daemon knows of one VM (persisted as meta.json). ``client`` is its live VM process handle."""

    name: str
    spec: VmSpec
    client: VmClient | None = None  # None when no VM process is attached
    handle: int | None = None
    measurement: str = ""
    policy: int = 0
    migration_policy: str = ""  # base64 of the canonical MigrationPolicy document (bound by HOST_DATA)
    state: VmState = VmState.CREATING
    created_at: float = field(default_factory=time.time)
    migrations: list[str] = field(default_factory=list)
    pending_recovery: dict[str, Any] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def meta(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "handle": self.handle,
            "measurement": self.measurement,
            "policy": self.policy,
            "migration_policy": self.migration_policy,
            "state": self.state.value,
            "created_at": self.created_at,
            "migrations": self.migrations,
            "pending_recovery": self.pending_recovery,
        }


class VmStore:
    """The daemon's VMs: the records of those on this host (in memory, under ``lock``) and the ``vms/``
    directory they persist to, one record per VM, written atomically with fsync."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.records: dict[str, VmRecord] = {}
        # VM name -> the host API URL it left for (in memory: after a restart a client resolves afresh).
        self.moved: dict[str, str] = {}

    def get(self, name: str) -> VmRecord | None:
        return self.records.get(name)

    def add(self, record: VmRecord) -> None:
        with self.lock:
            self.records[record.name] = record

    def forget(self, record: VmRecord) -> None:
        """Drop ``record`` from the VMs on this host (only that record: a newer one of the same name stays)."""
        with self.lock:
            if self.records.get(record.name) is record:
                del self.records[record.name]

    def live(self) -> list[VmRecord]:
        return [r for r in list(self.records.values()) if r.state not in GONE]

    def vm_dir(self, name: str) -> Path:
        return self.dir / name

    def save(self, record: VmRecord) -> None:
        write_json(self.vm_dir(record.name) / "meta.json", record.meta())

    def load_all(self) -> list[VmRecord]:
        """Every persisted VM that has not left this host (no live process attached yet)."""
        records = []
        for vm_dir in sorted(self.dir.iterdir()):
            meta_path, spec_path = vm_dir / "meta.json", vm_dir / "vm.json"
            if not meta_path.exists() or not spec_path.exists():
                continue
            spec = VmSpec.from_json(spec_path.read_text())
            meta = json.loads(meta_path.read_text())
            state = VmState.parse(meta.get("state"))
            if state in GONE:
                continue
            record = VmRecord(name=spec.name, spec=spec, state=state)
            for key in ("handle", "measurement", "policy", "migration_policy", "created_at", "migrations"):
                if key in meta:
                    setattr(record, key, meta[key])
            record.pending_recovery = meta.get("pending_recovery")
            records.append(record)
        return records
