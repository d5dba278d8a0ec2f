"""host layer: crash recovery of migrations — what a (re)started daemon does with a migration left half done.

The firmware is the truth; the daemon only asks it and acts within what it allows (DESIGN section 6):

Source, at start-up (``resolve_export``), by the export op-state of each re-attached VM::

    LIVE_EXPORT | PAUSED_EXPORT  before the start token: abort locally, resume (safe: the destination cannot
                                 commit without the start token)
    POST_EXPORT                  the start token may be out: stay stopped, ask the destination's
                                 GET /v1/migrations/{id}/outcome (persisted in meta.json ``pending_recovery``)
                                 until it answers — committed: export_finish with the destination's
                                 commit receipt + stop;  aborted: apply the abort token + resume (the
                                 firmware checks either token's MAC under K_b; no plaintext verdict counts)
    RUNNABLE                     a prepared or aborted session: destroy it; make sure the VM runs
    guest gone                   export_finish happened: the VM lives on the destination

Destination, at start-up (``resolve_import``), by the import op-state of each incoming VM::

    MEMORY_IMPORT | STATE_IMPORT | FAILED   import_abort: the abort token is persisted, so ``/outcome`` still
                                            serves it after the import context is discarded; stop the VM
    POST_IMPORT                             committed, not activated: import_activate + resume
    RUNNABLE                                it runs

Verdicts of incoming migrations are persisted the moment they exist (``OutcomeStore``:
``<data-dir>/incoming/<migration>.json``): an answer given once is given again after any restart.  The
poller never resumes a VM on its own authority and treats a rejected token as no answer (a forged verdict
costs nothing but time: it keeps asking).

Recovery works on the VM store (``host.store``), the platform and VM clients and the peer client
(``host.peer_client``); it knows nothing else of the daemon.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cvmotion.errors import CvmError, NotFound
from cvmotion.host.events import EventBus
from cvmotion.host.peer_client import PeerClient
from cvmotion.host.store import VmRecord, VmState, VmStore
from cvmotion.migration.stats import MigrationOutcome, MigrationStats, MigrationStatus, Verdict
from cvmotion.platformd.client import PlatformClient
from cvmotion.vmd.client import VmClient

__all__ = ["OutcomeStore", "Recovery"]

log = logging.getLogger("cvmotion.host")

_POLL_FIRST = 0.2
_POLL_MAX = 5.0
_IMPORTING = ("MEMORY_IMPORT", "STATE_IMPORT", "FAILED")


class OutcomeStore:
    """Durable verdicts of incoming migrations, one small JSON file each (written atomically)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def _path(self, mig_id: str) -> Path:
        if not mig_id.isalnum():
            raise NotFound(f"no incoming migration {mig_id!r} on this host")
        return self.dir / f"{mig_id}.json"

    def put(self, mig_id: str, vm: str, state: Verdict, token: bytes | None = None) -> None:
        doc: dict[str, Any] = {"migration": mig_id, "vm": vm, "state": state, "at": time.time()}
        if token is not None:
            doc["token"] = base64.b64encode(token).decode()
        path = self._path(mig_id)
        with self._lock:
            old = self.get(mig_id)
            if old is not None and old["state"] in (Verdict.COMMITTED, Verdict.ABORTED) and state != old["state"]:
                # A verdict never changes once given (the firmware could not produce the other one).
                log.error("incoming migration %s: refusing to replace verdict %s by %s", mig_id, old["state"], state)
                return
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(doc))
            tmp.replace(path)

    def get(self, mig_id: str) -> dict[str, Any] | None:
        try:
            doc: dict[str, Any] = json.loads(self._path(mig_id).read_text())
        except (OSError, ValueError):
            return None
        return doc

    def outcome(self, mig_id: str) -> dict[str, Any]:
        """The ``/outcome`` answer: committed, aborted (+ token), failed (no token exists) or in-progress."""
        doc = self.get(mig_id)
        if doc is None:
            raise NotFound(f"no incoming migration {mig_id!r} on this host")
        out = {"state": doc["state"]}
        if "token" in doc:
            out["token"] = doc["token"]
        return out


class Recovery:
    """The recovery paths of one daemon (source and destination side)."""

    def __init__(
        self,
        vms: VmStore,
        outcomes: OutcomeStore,
        platform: Callable[[], PlatformClient],
        peer_client: Callable[[], PeerClient],
        events: EventBus,
        migrations: dict[str, MigrationStats],
        stop: threading.Event,
    ) -> None:
        self.vms = vms
        self.outcomes = outcomes
        self.platform = platform
        self.peer_client = peer_client
        self.events = events
        self.migrations = migrations
        self._stop = stop
        self._polling: set[str] = set()
        self._lock = threading.Lock()

    # -- helpers ------------------------------------------------------------------------------------

    def _event(self, kind: str, record: VmRecord, **data: Any) -> None:
        self.events.publish(kind, {"vm": record.name, **data}, subject=record.name)

    def _vm(self, record: VmRecord, what: str, action: Callable[[VmClient], object]) -> bool:
        if record.client is None:
            return False
        try:
            action(record.client)
        except CvmError as exc:
            log.warning("VM %s: %s failed: %s", record.name, what, exc)
            return False
        return True

    def _resume(self, record: VmRecord) -> None:
        self._vm(record, "throttle", lambda vm: vm.throttle(0))
        if record.client is not None and record.client.info().get("state") != "running":
            record.client.resume()
        record.state = VmState.RUNNING

    def _stats(self, record: VmRecord, status: MigrationStatus, outcome: MigrationOutcome) -> None:
        mig_id = (record.pending_recovery or {}).get("migration")
        stats = self.migrations.get(str(mig_id))
        if stats is not None:
            stats.status, stats.outcome = status, outcome

    def _resumed(self, record: VmRecord, kind: str, **data: Any) -> None:
        """The export was aborted (before the start token, or with the destination's abort token): the VM runs
        here again and no migration is pending."""
        self._resume(record)
        self._stats(record, MigrationStatus.FAILED, MigrationOutcome.RESUMED_ON_SOURCE)
        record.pending_recovery = None
        self.vms.save(record)
        self._event(kind, record, **data)

    def _migrated(self, record: VmRecord) -> None:
        self._vm(record, "stop", VmClient.stop)
        record.state = VmState.MIGRATED
        record.client = None
        record.pending_recovery = None
        self.vms.save(record)
        self.vms.forget(record)

    # -- source -------------------------------------------------------------------------------------

    def resolve_export(self, record: VmRecord) -> None:
        """Start-up: settle a VM whose export a previous daemon left half done (module docstring)."""
        if record.handle is None:
            return
        platform = self.platform()
        handle = record.handle
        try:
            platform.guest_info(handle)
        except CvmError:
            if record.pending_recovery:
                # The guest context is gone: export_finish ran, the destination had committed.
                self._event("MigrationRecovered", record, outcome=Verdict.COMMITTED, how="guest already decommissioned")
                self._migrated(record)
            return
        state = platform.export_status(handle)
        if state in ("LIVE_EXPORT", "PAUSED_EXPORT"):
            platform.export_abort(handle)
            self._resumed(record, "MigrationAbortedAfterRestart", op_state=state)
        elif state == "POST_EXPORT":
            record.state = VmState.AWAITING_DESTINATION
            self.vms.save(record)
            if record.pending_recovery:
                self.start_polling(record)
            else:
                self._event("MigrationRecoveryBlocked", record, reason="no destination recorded; the VM stays stopped")
        elif record.pending_recovery:
            # RUNNABLE: a session was prepared (K_f made) or aborted just before the crash; destroy what is left.
            with contextlib.suppress(CvmError):
                platform.export_abort(handle)
            self._resumed(record, "MigrationAbortedAfterRestart", op_state=state)

    def start_polling(self, record: VmRecord) -> None:
        with self._lock:
            if record.name in self._polling:
                return
            self._polling.add(record.name)
        threading.Thread(target=self._poll, args=(record,), name=f"recover-{record.name}", daemon=True).start()

    def _poll(self, record: VmRecord) -> None:
        """The source sent its start token but heard no verdict: ask the destination until it answers."""
        try:
            pending = record.pending_recovery or {}
            url, dest_mig = pending.get("destination"), pending.get("dest_migration")
            if not url or not dest_mig or record.handle is None:
                return
            delay = _POLL_FIRST
            while not self._stop.is_set():
                try:
                    answer = self.peer_client().outcome(str(url), str(dest_mig))
                    if answer is not None and self.apply_outcome(record, answer):
                        return
                except (CvmError, ValueError) as exc:
                    # A verdict the firmware rejects (forged or replayed token): no answer; keep asking.
                    log.warning("migration recovery for %s: verdict rejected: %s", record.name, exc)
                    self._event("MigrationRecoveryRejected", record, error=str(exc) or type(exc).__name__)
                self._stop.wait(delay)
                delay = min(delay * 2, _POLL_MAX)
        finally:
            with self._lock:
                self._polling.discard(record.name)

    def apply_outcome(self, record: VmRecord, outcome: dict[str, Any]) -> bool:
        """Act on the destination's verdict; False when there is none yet. Raises if the firmware refuses it."""
        platform = self.platform()
        handle = record.handle
        if handle is None:
            return False
        state = outcome.get("state")
        if state == Verdict.COMMITTED and isinstance(outcome.get("token"), str):
            # The commit receipt: the firmware decommissions only if it verifies under K_b (else it raises).
            receipt = base64.b64decode(str(outcome["token"]), validate=True)
            platform.export_finish(handle, receipt)
            self._stats(record, MigrationStatus.COMPLETED, MigrationOutcome.RUNNING_ON_DESTINATION)
            self._event("MigrationRecovered", record, outcome=Verdict.COMMITTED)
            self._migrated(record)
            return True
        if state == Verdict.ABORTED and isinstance(outcome.get("token"), str):
            token = base64.b64decode(str(outcome["token"]), validate=True)
            platform.export_abort_with_token(handle, token)
            self._resumed(record, "MigrationRecovered", outcome="resumed")
            return True
        return False

    # -- destination --------------------------------------------------------------------------------

    def resolve_import(self, record: VmRecord) -> None:
        """Start-up: settle an incoming VM whose import a previous daemon left half done (module docstring)."""
        mig_id = record.migrations[-1] if record.migrations else ""
        platform = self.platform()
        try:
            status = platform.import_status(record.name)
        except CvmError:
            status = None  # no import context: the session never reached the MA, or it was discarded
        state = None if status is None else str(status["state"])
        if state == "POST_IMPORT":
            record.handle, receipt = platform.import_activate(record.name)
            self._committed(record, mig_id, "activated after restart", receipt)
        elif state == "RUNNABLE":
            handle = status["handle"] if status else None
            record.handle = None if handle is None else int(handle)
            receipt = platform.import_commit_receipt(record.name)
            self._committed(record, mig_id, "running", receipt)
        else:
            token: bytes | None = None
            if state in _IMPORTING:
                with contextlib.suppress(CvmError):
                    token = platform.import_abort(record.name)
            if mig_id:
                self.outcomes.put(mig_id, record.name, Verdict.ABORTED if token else Verdict.FAILED, token)
            self._vm(record, "stop", VmClient.stop)
            with contextlib.suppress(CvmError):
                platform.import_discard(record.name)
            record.state = VmState.DELETED
            record.client = None
            self.vms.save(record)
            self.vms.forget(record)
            self._event("MigrationAbortedAfterRestart", record, migration=mig_id, op_state=state, token=bool(token))

    def _committed(self, record: VmRecord, mig_id: str, how: str, receipt: bytes) -> None:
        if mig_id:
            self.outcomes.put(mig_id, record.name, Verdict.COMMITTED, receipt)
        if record.client is not None:
            self._resume(record)
        record.state = VmState.RUNNING if record.client is not None else VmState.LOST
        self.vms.save(record)
        self._event("MigrationRecovered", record, migration=mig_id, outcome=Verdict.COMMITTED, how=how)

    def incoming_event(self, record: VmRecord, mig_id: str, kind: str, data: dict[str, Any], token: Any) -> None:
        """Persist a verdict the moment the receiver reaches it (before anyone is told)."""
        if kind == "MigrationCommitted":
            self.outcomes.put(mig_id, record.name, Verdict.COMMITTED, token if isinstance(token, bytes) else None)
            record.handle = int(data["handle"]) if data.get("handle") is not None else record.handle
            record.state = VmState.RUNNING
            self.vms.save(record)
        elif kind == "MigrationImportFailed":
            blob = token if isinstance(token, bytes) else None
            self.outcomes.put(mig_id, record.name, Verdict.ABORTED if blob else Verdict.FAILED, blob)
