"""host layer: the memory-preserving update in place — VMs paused while the host's software is replaced.

``POST /v1/host/maintenance`` (kind ``MemoryPreservingUpdate``) runs it; ``GET /v1/host/maintenance/{id}``
answers its record, which lives in ``<data-dir>/maintenance/<id>.json`` (atomic, fsync) so the next daemon
answers it too.  The steps, and who takes each (``host.succession`` for the hand-overs)::

    old daemon   start the platform's and the daemon's successors (newest installed code); wait until loaded
                 pause every running VM ............................................. pause starts (per VM)
                 the platform seals the SP's state and exits (firmware.sp_seal: once, never rolled back)
                 "go" to the platform successor: it opens the sealed state, serves; the VM processes
                   re-attach to it (their hardware token proves they are the hardware the guest ran on)
                 "go" to the daemon successor, and exit
    new daemon   take over the sockets and the VM processes; resume every VM paused .... pause ends (per VM)
                 re-attest each VM (its paravisor asks the restarted SP for a fresh report), record the result

The VM process times its own pause (monotonic clock, from its vCPUs being asked to stop to their release), so
``pauseMs`` is what the guest missed, whatever the daemons' clocks say.  A failure before the seal resumes
every VM on the old platform; after it the VMs can run only on an SP that opened the sealed state, so a
failure leaves them paused (stopped, never forked) and the record says why.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import threading
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cvmotion.errors import Conflict, CvmError, NotFound, UsageError
from cvmotion.files import write_json
from cvmotion.host.succession import Successor, spawn_daemon_successor, spawn_process_successor
from cvmotion.ipc.names import NAME_PATTERN, check_name

if TYPE_CHECKING:
    from cvmotion.host.daemon import HostDaemon

__all__ = [
    "Maintenance",
    "MaintenanceAccepted",
    "MaintenanceRecord",
    "MaintenanceRequest",
    "MaintenanceRunner",
    "MaintenanceStatus",
    "MaintenanceVm",
]

log = logging.getLogger("cvmotion.host.maintenance")

KIND = "MemoryPreservingUpdate"
_LOAD_TIMEOUT = 120.0  # a successor's interpreter start and imports, on a loaded host
_TAKEOVER_TIMEOUT = 30.0


class MaintenanceStatus(enum.StrEnum):
    IN_PROGRESS = "InProgress"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class Phase(enum.StrEnum):
    """Where a maintenance is (persisted, so a daemon that starts mid-way knows what is left to do)."""

    PREPARING = "preparing"  # successors loading; every VM runs
    PAUSED = "paused"  # the VMs in ``paused`` are paused; the old platform still holds the SP state
    SEALED = "sealed"  # the SP state is sealed: the VMs can run only on the platform that opens it
    HANDED_OVER = "handed-over"  # the new platform serves; the new daemon resumes the VMs
    DONE = "done"


# -- the API's shapes ---------------------------------------------------------------------------------


class MaintenanceRequest(BaseModel):
    """``POST /v1/host/maintenance``: a host-level step the controller asks for once it moved off what it could."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: str = Field(pattern=NAME_PATTERN, description="the caller's id: the same id again answers the same record")
    kind: Literal["MemoryPreservingUpdate"]


class MaintenanceAccepted(BaseModel):
    id: str
    kind: Literal["MemoryPreservingUpdate"]
    status: Literal["InProgress", "Succeeded", "Failed"]


class MaintenanceVm(BaseModel):
    name: str
    pauseMs: float | None = Field(description="vCPUs stopped to running again, measured by the VM process")
    reattested: bool
    outcome: Literal["Succeeded", "Failed"]
    reason: str | None


class Maintenance(BaseModel):
    id: str
    kind: Literal["MemoryPreservingUpdate"]
    status: Literal["InProgress", "Succeeded", "Failed"]
    startedAt: str
    endedAt: str | None
    platformRestarted: bool
    daemonRestarted: bool
    vms: list[MaintenanceVm]
    error: str | None


# -- the record ---------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class VmOutcome:
    name: str
    pause_ms: float | None = None
    reattested: bool = False
    outcome: str = "Succeeded"
    reason: str | None = None


@dataclass
class MaintenanceRecord:
    id: str
    kind: str = KIND
    status: MaintenanceStatus = MaintenanceStatus.IN_PROGRESS
    started_at: str = field(default_factory=_now)
    ended_at: str | None = None
    platform_restarted: bool = False
    daemon_restarted: bool = False
    vms: list[VmOutcome] = field(default_factory=list)
    error: str | None = None
    phase: Phase = Phase.PREPARING
    paused: list[str] = field(default_factory=list)  # the VMs this maintenance paused (to resume)

    def answer(self) -> Maintenance:
        return Maintenance.model_validate(
            {
                "id": self.id,
                "kind": self.kind,
                "status": self.status.value,
                "startedAt": self.started_at,
                "endedAt": self.ended_at,
                "platformRestarted": self.platform_restarted,
                "daemonRestarted": self.daemon_restarted,
                "vms": [
                    {"name": v.name, "pauseMs": v.pause_ms, "reattested": v.reattested, "outcome": v.outcome,
                     "reason": v.reason}
                    for v in self.vms
                ],
                "error": self.error,
            }
        )  # fmt: skip

    def to_doc(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["status"], doc["phase"] = self.status.value, self.phase.value
        return doc

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> MaintenanceRecord:
        doc = dict(doc)
        doc["status"] = MaintenanceStatus(doc["status"])
        doc["phase"] = Phase(doc["phase"])
        doc["vms"] = [VmOutcome(**v) for v in doc["vms"]]
        return cls(**doc)


class MaintenanceStore:
    """``<root>/<id>.json`` per maintenance."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def save(self, record: MaintenanceRecord) -> None:
        write_json(self.root / f"{record.id}.json", record.to_doc())

    def load(self, maintenance_id: str) -> MaintenanceRecord | None:
        path = self.root / f"{check_name('maintenance id', maintenance_id)}.json"
        try:
            return MaintenanceRecord.from_doc(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"maintenance {maintenance_id!r}: the record is unreadable ({exc})") from exc

    def in_progress(self) -> list[MaintenanceRecord]:
        records = []
        for path in sorted(self.root.glob("*.json")):
            with contextlib.suppress(UsageError):
                record = self.load(path.stem)
                if record is not None and record.status is MaintenanceStatus.IN_PROGRESS:
                    records.append(record)
        return records


# -- running it ---------------------------------------------------------------------------------------


class MaintenanceRunner:
    """The host's maintenance: started by the old daemon, finished by the new one."""

    def __init__(self, daemon: HostDaemon) -> None:
        self._daemon = daemon
        self.store = MaintenanceStore(daemon.dir / "maintenance")
        self._lock = threading.Lock()
        self.finishing: list[threading.Thread] = []  # re-attestations after a take-over (they end the record)

    def get(self, maintenance_id: str) -> MaintenanceRecord:
        record = self.store.load(maintenance_id)
        if record is None:
            raise NotFound(f"no maintenance {maintenance_id!r} on host {self._daemon.config.name}")
        return record

    def request(self, req: MaintenanceRequest) -> MaintenanceRecord:
        """Start the update (202), or answer the record of the same id; another id while one runs: Conflict."""
        with self._lock:
            existing = self.store.load(req.id)
            if existing is not None:
                return existing
            busy = [r.id for r in self.store.in_progress()]
            if busy:
                raise Conflict(f"maintenance {busy[0]!r} is in progress on host {self._daemon.config.name}")
            migrating = self._daemon.migrating_vms()
            record = MaintenanceRecord(id=req.id)
            if migrating:
                raise Conflict(f"VMs are migrating ({', '.join(migrating)}): an update in place waits for them")
            self.store.save(record)
        self.run_in_background(record)
        return record

    def run_in_background(self, record: MaintenanceRecord) -> None:
        threading.Thread(target=self.run, args=(record,), name=f"maintenance-{record.id}", daemon=True).start()

    # -- the old daemon --------------------------------------------------------------------------------

    def run(self, record: MaintenanceRecord) -> None:
        """The old daemon's part: successors, pause, seal, hand-over (it ends this process on success)."""
        daemon = self._daemon
        platform_next: Successor | None = None
        daemon_next: Successor | None = None
        try:
            daemon.events.publish("MaintenanceStarted", {"id": record.id, "kind": record.kind})
            predecessor = daemon.platform_pid()
            cmd = daemon.platform_command() + ([] if predecessor is None else ["--predecessor", str(predecessor)])
            platform_next = spawn_process_successor("platform", cmd, daemon.dir / "platform.log")
            daemon_next = spawn_daemon_successor(
                *daemon.listening_sockets(), record.id, daemon.dir / "host-successor.log"
            )
            platform_next.wait_ready(_LOAD_TIMEOUT)
            daemon_next.wait_ready(_LOAD_TIMEOUT)
            log.info("maintenance %s: successors loaded", record.id)
            self._pause_all(record)
            log.info("maintenance %s: %d VMs paused", record.id, len(record.paused))
            record.phase = Phase.SEALED
            self.store.save(record)
            daemon.seal_platform()
            log.info("maintenance %s: the secure processor sealed its state", record.id)
        except (CvmError, OSError) as exc:
            log.exception("maintenance %s failed before the secure processor sealed its state", record.id)
            for successor in (platform_next, daemon_next):
                if successor is not None:
                    successor.abandon()
            self._resume_all(record, restarted=False)
            self._finish(record, error=f"{exc}")
            return
        # Sealed: the old platform is gone. Only the successor can run the VMs now.
        try:
            platform_next.go()
            platform_next.wait_serving(_TAKEOVER_TIMEOUT)
            log.info("maintenance %s: the successor platform serves", record.id)
            record.platform_restarted = True
            record.phase = Phase.HANDED_OVER
            self.store.save(record)
            daemon_next.go()
        except (CvmError, OSError) as exc:
            log.exception("maintenance %s: the hand-over failed", record.id)
            daemon_next.abandon()
            with contextlib.suppress(CvmError, OSError):
                daemon.platform_fallback()  # a platform started here opens the sealed state
            self._resume_all(record, restarted=True)
            self._finish(record, error=f"the hand-over failed: {exc}")
            return
        daemon.exit_for_successor()

    def _pause_all(self, record: MaintenanceRecord) -> None:
        for name in self._daemon.running_vms():
            self._daemon.vm_client(name).pause()
            record.paused.append(name)
        record.phase = Phase.PAUSED
        self.store.save(record)

    # -- whichever daemon ends it ------------------------------------------------------------------------

    def resume_after_start(self) -> None:
        """On start: finish a maintenance a predecessor handed over (or left half done by dying)."""
        for record in self.store.in_progress():
            handed = record.phase is Phase.HANDED_OVER
            if handed:
                record.daemon_restarted = True
            self._resume_all(record, restarted=record.phase in (Phase.SEALED, Phase.HANDED_OVER))
            log.info("maintenance %s: %d VMs resumed", record.id, len(record.paused))
            error = None if handed else f"the daemon stopped while the maintenance was {record.phase.value}"
            finishing = threading.Thread(
                target=self._reattest_and_finish, args=(record, error), name=f"reattest-{record.id}", daemon=True
            )
            finishing.start()
            self.finishing.append(finishing)

    def _resume_all(self, record: MaintenanceRecord, *, restarted: bool) -> None:
        outcomes = {v.name: v for v in record.vms}
        for name in record.paused:
            outcome = outcomes.setdefault(name, VmOutcome(name))
            try:
                pause = self._daemon.resume_vm(name)
                outcome.pause_ms = None if pause is None else round(pause * 1000, 3)
            except (CvmError, OSError) as exc:
                outcome.outcome, outcome.reason = "Failed", f"resume: {exc}"
        record.vms = list(outcomes.values())
        record.platform_restarted = record.platform_restarted or restarted
        self.store.save(record)

    def _reattest_and_finish(self, record: MaintenanceRecord, error: str | None) -> None:
        if record.platform_restarted:
            for outcome in record.vms:
                if outcome.outcome != "Succeeded":
                    continue
                try:
                    outcome.reattested = bool(self._daemon.vm_client(outcome.name).reattest()["reattested"])
                except (CvmError, OSError) as exc:
                    outcome.reason = f"re-attestation failed: {exc}"
        self._finish(record, error=error)

    def _finish(self, record: MaintenanceRecord, *, error: str | None) -> None:
        failed = [v.name for v in record.vms if v.outcome != "Succeeded"]
        if error is None and failed:
            error = f"VMs not resumed: {', '.join(failed)}"
        record.error = error
        record.status = MaintenanceStatus.FAILED if error else MaintenanceStatus.SUCCEEDED
        record.phase = Phase.DONE
        record.ended_at = _now()
        record.paused = []
        self.store.save(record)
        self._daemon.events.publish(
            "MaintenanceCompleted",
            {"id": record.id, "status": record.status.value, "error": error,
             "vms": [asdict(v) for v in record.vms]},
        )  # fmt: skip
