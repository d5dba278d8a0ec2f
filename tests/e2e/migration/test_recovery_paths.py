"""host.recovery without processes: every restart branch against a scripted platform (fast; no KVM).

The process-level fault tests reach most branches by timing; these pin each one down, including those a test
cannot hit on purpose (an import committed but not activated when the daemon died, a verdict file that would
change, a poller fed a forged token before the real verdict).
"""

from __future__ import annotations

import base64
import threading
from pathlib import Path
from typing import Any, cast

import pytest

from cvmotion.errors import FirmwareError, FirmwareStatus, IntegrityError, NotFound, UsageError
from cvmotion.host import recovery as recovery_module
from cvmotion.host.events import EventBus
from cvmotion.host.peer_client import PeerClient
from cvmotion.host.recovery import OutcomeStore, Recovery
from cvmotion.host.store import VmRecord, VmState, VmStore
from cvmotion.ipc.rpc import Endpoint
from cvmotion.migration.stats import MigrationStats, MigrationStatus
from cvmotion.platformd.client import PlatformClient
from cvmotion.vmd.client import VmClient
from cvmotion.vmd.protocol import VmSpec

TOKEN = b"\x18" * 64
RECEIPT = b"\x19" * 88  # the destination firmware's commit receipt (its MAC is the fake's to check)
B64_RECEIPT = base64.b64encode(RECEIPT).decode()


class FakePlatform:
    """The platform process as the daemon sees it, with scripted op-states; records every call."""

    def __init__(self, *, import_state: str | None = None, export_state: str = "RUNNABLE", guest: bool = True) -> None:
        self.import_state = import_state
        self.export_state = export_state
        self.guest = guest
        self.calls: list[str] = []

    closed = False

    def call(self, method: str, args: dict[str, Any] | None = None, blob: bytes = b"", **kw: Any) -> Any:
        self.calls.append(method)
        if method == "import_status":
            if self.import_state is None:
                raise UsageError("no import in progress")
            return {"state": self.import_state, "handle": 7}, b"", []
        if method == "import_abort":
            if self.import_state in ("POST_IMPORT", "RUNNABLE"):
                raise FirmwareError(FirmwareStatus.INVALID_GUEST_STATE, "committed imports cannot be aborted")
            return {}, TOKEN, []
        if method == "import_activate":
            self.import_state = "RUNNABLE"
            return {"handle": 7}, RECEIPT, []
        if method == "import_commit_receipt":
            if self.import_state not in ("POST_IMPORT", "RUNNABLE"):
                raise FirmwareError(FirmwareStatus.INVALID_GUEST_STATE, "not committed")
            return {}, RECEIPT, []
        if method == "export_finish":
            if blob != RECEIPT:
                raise IntegrityError()
            self.guest = False
        if method == "guest_info":
            if not self.guest:
                raise FirmwareError(FirmwareStatus.INVALID_GUEST, "no guest")
            return {"state": "RUNNING"}, b"", []
        if method == "export_status":
            return {"state": self.export_state}, b"", []
        if method == "export_abort_with_token":
            if blob != TOKEN:
                raise IntegrityError()
            self.export_state = "RUNNABLE"
        if method == "export_abort":
            if self.export_state == "POST_EXPORT":
                raise FirmwareError(FirmwareStatus.INVALID_GUEST_STATE, "after the start token")
            self.export_state = "RUNNABLE"
        return {}, b"", []


class FakeVm:
    def __init__(self, state: str = "paused") -> None:
        self.state = state
        self.calls: list[str] = []

    closed = False

    def call(self, method: str, args: dict[str, Any] | None = None, blob: bytes = b"", **kw: Any) -> Any:
        if method == "info":
            return {"state": self.state}, b"", []
        self.calls.append(method)
        if method == "resume":
            self.state = "running"
        return {}, b"", []


class FakePeerClient:
    """The destination as the recovery poller reaches it (``host.peer_client``): scripted verdicts, in order."""

    def __init__(self) -> None:
        self.answers: list[dict[str, Any] | None] = []
        self.asked: list[tuple[str, str]] = []

    def outcome(self, url: str, migration: str) -> dict[str, Any] | None:
        self.asked.append((url, migration))
        return self.answers.pop(0) if self.answers else None


class World:
    """What recovery works on: the VM store, the platform and VM clients (over scripted fakes), a peer client."""

    def __init__(self, root: Path, platform: FakePlatform) -> None:
        self.store = VmStore(root / "vms")
        self.platform = PlatformClient(cast(Endpoint, platform))
        self.events = EventBus("/hosts/test")
        self.migrations: dict[str, MigrationStats] = {}
        self.peer_client = FakePeerClient()
        self.outcomes = OutcomeStore(root / "incoming")

    @property
    def vms(self) -> dict[str, VmRecord]:
        return self.store.records


def _setup(tmp_path: Path, platform: FakePlatform, *, state: str, vm: FakeVm | None = None) -> tuple[Any, Any]:
    world = World(tmp_path, platform)
    client = VmClient("vm1", cast(Endpoint, vm or FakeVm()))
    record = VmRecord(name="vm1", spec=VmSpec(name="vm1", memory=16 << 20), client=client, state=VmState(state))
    record.handle = 3
    record.migrations.append("abc123")
    world.store.add(record)
    recovery = Recovery(
        world.store,
        world.outcomes,
        lambda: world.platform,
        lambda: cast(PeerClient, world.peer_client),
        world.events,
        world.migrations,
        threading.Event(),
    )
    recovery.daemon = world  # type: ignore[attr-defined]
    return recovery, record


def _kinds(recovery: Recovery) -> list[str]:
    return [e["type"].removeprefix("cvmotion.") for e in recovery.events.recent(50)]


# -- destination ------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["MEMORY_IMPORT", "STATE_IMPORT", "FAILED"])
def test_unfinished_import_is_aborted_and_its_token_kept(tmp_path: Path, state: str) -> None:
    platform = FakePlatform(import_state=state)
    recovery, record = _setup(tmp_path, platform, state="incoming", vm=FakeVm("incoming"))
    recovery.resolve_import(record)
    assert platform.calls == ["import_status", "import_abort", "import_discard"]
    assert record.client is None
    assert record.state == "deleted"
    assert "vm1" not in recovery.daemon.vms
    # The verdict outlives the import context: a restarted source daemon can still fetch the token.
    assert recovery.outcomes.outcome("abc123") == {"state": "aborted", "token": base64.b64encode(TOKEN).decode()}


def test_committed_but_not_activated_import_is_activated(tmp_path: Path) -> None:
    platform = FakePlatform(import_state="POST_IMPORT")
    vm = FakeVm("incoming")
    recovery, record = _setup(tmp_path, platform, state="incoming", vm=vm)
    recovery.resolve_import(record)
    assert platform.calls[:2] == ["import_status", "import_activate"]
    assert "import_abort" not in platform.calls
    assert "resume" in vm.calls
    assert (record.state, record.handle) == ("running", 7)
    assert recovery.outcomes.outcome("abc123") == {"state": "committed", "token": B64_RECEIPT}


def test_running_import_stays(tmp_path: Path) -> None:
    platform = FakePlatform(import_state="RUNNABLE")
    vm = FakeVm("running")
    recovery, record = _setup(tmp_path, platform, state="incoming", vm=vm)
    recovery.resolve_import(record)
    assert "resume" not in vm.calls
    assert "import_abort" not in platform.calls
    assert record.state == "running"
    assert recovery.outcomes.outcome("abc123") == {"state": "committed", "token": B64_RECEIPT}


def test_import_without_a_context_fails_without_a_token(tmp_path: Path) -> None:
    recovery, record = _setup(tmp_path, FakePlatform(import_state=None), state="incoming", vm=FakeVm("incoming"))
    recovery.resolve_import(record)
    assert record.state == "deleted"
    assert recovery.outcomes.outcome("abc123") == {"state": "failed"}


def test_a_verdict_never_changes(tmp_path: Path) -> None:
    store = OutcomeStore(tmp_path / "incoming")
    store.put("m1", "vm1", "in-progress")
    store.put("m1", "vm1", "committed", RECEIPT)
    store.put("m1", "vm1", "aborted", TOKEN)
    assert store.outcome("m1") == {"state": "committed", "token": B64_RECEIPT}
    with pytest.raises(NotFound):
        store.outcome("m2")
    with pytest.raises(NotFound):
        store.outcome("../../etc/passwd")


# -- source -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["LIVE_EXPORT", "PAUSED_EXPORT"])
def test_export_before_the_start_token_aborts_and_resumes(tmp_path: Path, state: str) -> None:
    platform = FakePlatform(export_state=state)
    vm = FakeVm("paused")
    recovery, record = _setup(tmp_path, platform, state="paused", vm=vm)
    record.pending_recovery = {"migration": "m", "destination": "http://127.0.0.1:9", "dest_migration": "d"}
    recovery.resolve_export(record)
    assert "export_abort" in platform.calls
    assert vm.calls[-1] == "resume"
    assert record.state == "running"
    assert record.pending_recovery is None


def test_frozen_source_waits_and_rejects_a_forged_verdict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """POST_EXPORT after a restart: stay stopped, ask the destination; a forged token is no answer; the real
    verdict (committed) retires the source."""
    platform = FakePlatform(export_state="POST_EXPORT")
    vm = FakeVm("paused")
    recovery, record = _setup(tmp_path, platform, state="migrating", vm=vm)
    stats = MigrationStats(id="m", vm="vm1", status=MigrationStatus.FAILED)
    recovery.daemon.migrations["m"] = stats
    record.pending_recovery = {"migration": "m", "destination": "http://dest", "dest_migration": "d"}
    recovery.daemon.peer_client.answers = [
        None,  # unreachable
        {"state": "in-progress"},
        {"state": "aborted", "token": base64.b64encode(b"forged").decode()},
        {"state": "committed"},  # a plaintext verdict with no proof: no answer
        {"state": "committed", "token": base64.b64encode(b"forged receipt").decode()},
        {"state": "committed", "token": B64_RECEIPT},
    ]
    monkeypatch.setattr(recovery_module, "_POLL_FIRST", 0.001)
    recovery.resolve_export(record)
    deadline = threading.Event()
    for _ in range(200):
        if record.state == "migrated":
            break
        deadline.wait(0.01)
    assert record.state == "migrated"
    assert "resume" not in vm.calls  # never ran again: neither on its own nor on the forged token
    assert platform.calls.count("export_abort_with_token") == 1
    assert platform.calls.count("export_finish") == 2  # the forged receipt refused, then the real one
    assert (stats.status, stats.outcome) == (MigrationStatus.COMPLETED, "running on destination")
    assert "MigrationRecoveryRejected" in _kinds(recovery)
    assert recovery.daemon.peer_client.asked == [("http://dest", "d")] * 6


def test_aborted_verdict_resumes_with_the_token(tmp_path: Path) -> None:
    platform = FakePlatform(export_state="POST_EXPORT")
    vm = FakeVm("paused")
    recovery, record = _setup(tmp_path, platform, state="paused (awaiting destination)", vm=vm)
    record.pending_recovery = {"migration": "m", "destination": "http://dest", "dest_migration": "d"}
    with pytest.raises(IntegrityError):
        recovery.apply_outcome(record, {"state": "aborted", "token": base64.b64encode(b"x" * 64).decode()})
    assert "resume" not in vm.calls
    assert not recovery.apply_outcome(record, {"state": "in-progress"})
    assert recovery.apply_outcome(record, {"state": "aborted", "token": base64.b64encode(TOKEN).decode()})
    assert vm.calls[-1] == "resume"
    assert record.state == "running"


def test_source_whose_guest_is_gone_was_migrated(tmp_path: Path) -> None:
    """The daemon died after export_finish and before it wrote "migrated"."""
    recovery, record = _setup(tmp_path, FakePlatform(guest=False), state="paused")
    record.pending_recovery = {"migration": "m", "destination": "http://dest", "dest_migration": "d"}
    recovery.resolve_export(record)
    assert record.state == "migrated"
    assert "vm1" not in recovery.daemon.vms
