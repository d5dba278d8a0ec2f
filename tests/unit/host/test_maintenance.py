"""host.maintenance: the update-in-place record and its runner against a fake daemon (no processes).

The old daemon's part (successors, pause, seal, hand-over) and the new daemon's (resume, re-attest, record) are
driven step by step; what the record says, and what is resumed when a step fails, is checked.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from cvmotion.errors import Conflict, NotFound, UsageError
from cvmotion.host import maintenance as m


@dataclass
class FakeVm:
    name: str
    paused: bool = False
    fail_pause: bool = False
    fail_resume: bool = False

    def pause(self) -> float:
        if self.fail_pause:
            raise UsageError("the VM did not stop")
        self.paused = True
        return 0.001

    def reattest(self) -> dict[str, Any]:
        return {"reattested": True, "jti": "j"}


@dataclass
class FakeSuccessor:
    what: str
    log: list[str]

    def wait_ready(self, timeout: float) -> None:
        self.log.append(f"{self.what} ready")

    def go(self) -> None:
        self.log.append(f"{self.what} go")

    def wait_serving(self, timeout: float) -> None:
        self.log.append(f"{self.what} serving")

    def abandon(self) -> None:
        self.log.append(f"{self.what} abandoned")


@dataclass
class FakeDaemon:
    dir: Path
    vms: dict[str, FakeVm] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    migrating: list[str] = field(default_factory=list)
    seal_error: Exception | None = None
    exited: threading.Event = field(default_factory=threading.Event)

    class config:  # noqa: N801 - the daemon's attribute
        name = "host-t"

    class events:  # noqa: N801
        @staticmethod
        def publish(*_: Any, **__: Any) -> None:
            return None

    def migrating_vms(self) -> list[str]:
        return self.migrating

    def running_vms(self) -> list[str]:
        return [n for n, vm in self.vms.items() if not vm.paused]

    def vm_client(self, name: str) -> FakeVm:
        return self.vms[name]

    def resume_vm(self, name: str) -> float:
        vm = self.vms[name]
        if vm.fail_resume:
            raise UsageError("the VM process is gone")
        vm.paused = False
        return 0.25

    def platform_pid(self) -> int:
        return 4242

    def platform_command(self) -> list[str]:
        return ["platformd"]

    def listening_sockets(self) -> tuple[Any, Any]:
        return None, None

    def seal_platform(self) -> None:
        if self.seal_error is not None:
            raise self.seal_error
        self.log.append("sealed")

    def platform_fallback(self) -> None:
        self.log.append("fallback")

    def exit_for_successor(self) -> None:
        self.log.append("exit")
        self.exited.set()


@pytest.fixture
def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeDaemon:
    d = FakeDaemon(tmp_path, {"a": FakeVm("a"), "b": FakeVm("b")})
    monkeypatch.setattr(m, "spawn_process_successor", lambda what, cmd, log: FakeSuccessor(what, d.log))
    monkeypatch.setattr(m, "spawn_daemon_successor", lambda *args: FakeSuccessor("daemon", d.log))
    return d


def _runner(daemon: FakeDaemon) -> m.MaintenanceRunner:
    return m.MaintenanceRunner(daemon)  # type: ignore[arg-type]


def _settle(runner: m.MaintenanceRunner) -> None:
    for thread in runner.finishing:
        thread.join(30)
        assert not thread.is_alive()


def _request(maintenance_id: str) -> m.MaintenanceRequest:
    return m.MaintenanceRequest(id=maintenance_id, kind="MemoryPreservingUpdate")


def _run_inline(runner: m.MaintenanceRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the old daemon's part in the calling thread."""
    monkeypatch.setattr(runner, "run_in_background", runner.run)


def test_old_daemon_pauses_seals_hands_over_and_the_new_one_finishes(
    daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = _runner(daemon)
    _run_inline(runner, monkeypatch)
    record = runner.request(_request("upd-1"))
    assert daemon.log == [
        "platform ready", "daemon ready", "sealed", "platform go", "platform serving", "daemon go", "exit"
    ]  # fmt: skip
    assert all(vm.paused for vm in daemon.vms.values())
    handed = runner.get("upd-1")
    assert (handed.phase, handed.status) == (m.Phase.HANDED_OVER, m.MaintenanceStatus.IN_PROGRESS)
    assert handed.paused == ["a", "b"]
    # The successor daemon starts: it resumes what was paused, re-attests, records.
    successor = _runner(daemon)
    successor.resume_after_start()
    _settle(successor)
    done = runner.get(record.id).answer()
    assert done.status == "Succeeded"
    assert done.platformRestarted
    assert done.daemonRestarted
    assert [(v.name, v.pauseMs, v.reattested, v.outcome) for v in done.vms] == [
        ("a", 250.0, True, "Succeeded"), ("b", 250.0, True, "Succeeded")
    ]  # fmt: skip
    assert not any(vm.paused for vm in daemon.vms.values())
    assert done.endedAt is not None
    assert done.error is None


def test_same_id_answers_the_same_record_another_id_conflicts(
    daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = _runner(daemon)
    monkeypatch.setattr(runner, "run_in_background", lambda record: None)  # stays in progress
    first = runner.request(_request("upd-1"))
    assert runner.request(_request("upd-1")).started_at == first.started_at
    with pytest.raises(Conflict, match="upd-1"):
        runner.request(_request("upd-2"))
    with pytest.raises(NotFound):
        runner.get("upd-3")


def test_no_update_while_a_vm_migrates(daemon: FakeDaemon) -> None:
    daemon.migrating = ["a"]
    with pytest.raises(Conflict, match="migrating"):
        _runner(daemon).request(_request("upd-1"))
    with pytest.raises(NotFound):
        _runner(daemon).get("upd-1")


def test_a_failure_before_the_seal_resumes_every_vm_here(daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    daemon.seal_error = UsageError("an import is in flight")
    runner = _runner(daemon)
    _run_inline(runner, monkeypatch)
    runner.request(_request("upd-1"))
    done = runner.get("upd-1").answer()
    assert done.status == "Failed"
    assert "import is in flight" in str(done.error)
    assert not done.platformRestarted
    assert not done.daemonRestarted
    assert not any(vm.paused for vm in daemon.vms.values())
    assert "platform abandoned" in daemon.log
    assert "daemon abandoned" in daemon.log
    assert "exit" not in daemon.log


def test_a_vm_that_does_not_stop_fails_the_update_and_the_others_resume(
    daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon.vms["b"].fail_pause = True
    runner = _runner(daemon)
    _run_inline(runner, monkeypatch)
    runner.request(_request("upd-1"))
    done = runner.get("upd-1").answer()
    assert done.status == "Failed"
    assert "did not stop" in str(done.error)
    assert "sealed" not in daemon.log
    assert not daemon.vms["a"].paused


def test_a_daemon_that_died_mid_way_is_finished_by_the_next(daemon: FakeDaemon) -> None:
    runner = _runner(daemon)
    record = m.MaintenanceRecord(id="upd-1", phase=m.Phase.PAUSED, paused=["a"])
    daemon.vms["a"].paused = True
    daemon.vms["b"].fail_resume = True
    runner.store.save(record)
    runner.resume_after_start()
    _settle(runner)
    done = runner.get("upd-1").answer()
    assert done.status == "Failed"
    assert "paused" in str(done.error)
    assert not daemon.vms["a"].paused
    assert [(v.name, v.outcome) for v in done.vms] == [("a", "Succeeded")]


def test_a_vm_that_does_not_resume_is_failed_in_the_record(daemon: FakeDaemon) -> None:
    runner = _runner(daemon)
    daemon.vms["b"].fail_resume = True
    runner.store.save(m.MaintenanceRecord(id="upd-1", phase=m.Phase.HANDED_OVER, paused=["a", "b"]))
    runner.resume_after_start()
    _settle(runner)
    done = runner.get("upd-1").answer()
    assert done.status == "Failed"
    assert done.error == "VMs not resumed: b"
    outcomes = {v.name: (v.outcome, v.reason) for v in done.vms}
    assert outcomes["a"] == ("Succeeded", None)
    assert outcomes["b"][0] == "Failed"
    assert "gone" in str(outcomes["b"][1])


@pytest.mark.parametrize(
    "body",
    [
        {"id": "upd-1"},
        {"id": "UPD", "kind": "MemoryPreservingUpdate"},
        {"id": "upd-1", "kind": "Reboot"},
        {"id": "upd-1", "kind": "MemoryPreservingUpdate", "extra": 1},
        {"id": "-x", "kind": "MemoryPreservingUpdate"},
    ],
)
def test_bad_requests_are_refused(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        m.MaintenanceRequest.model_validate(body)


def test_an_unreadable_record_is_a_clear_error(daemon: FakeDaemon) -> None:
    runner = _runner(daemon)
    (daemon.dir / "maintenance").mkdir()
    (daemon.dir / "maintenance" / "upd-1.json").write_text("{")
    with pytest.raises(UsageError, match="unreadable"):
        runner.get("upd-1")
