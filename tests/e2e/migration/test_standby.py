"""The warm VM process a host keeps for its next VM (``host.standby``): a new VM runs in it, another one is
started once the host is quiet, and a standby never outlives its daemon."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from mig_world import MEMORY, World

from cvmotion.testing.hosts import HostProcess, pid_alive

pytestmark = pytest.mark.timeout(180)


def _standby_pid(host: HostProcess, *, other_than: int | None = None, timeout: float = 60.0) -> tuple[int, Path]:
    """The pid and directory of the host's ready standby (bounded wait)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid_file in sorted(host.data_dir.glob("standby/*/pid")):
            try:
                pid = int(pid_file.read_text())
            except (OSError, ValueError):
                continue
            ready = (pid_file.parent / "control.sock").exists()
            if ready and pid != other_than and pid_alive(pid):
                return pid, pid_file.parent
        time.sleep(0.05)
    raise AssertionError(f"{host.name} has no standby VM process after {timeout:.0f} s")


def _cmdline(pid: int) -> list[str]:
    return [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]


def test_a_new_vm_runs_in_the_warm_process(attack_world: World) -> None:
    host = attack_world.a
    warm, warm_dir = _standby_pid(host)
    host.api(
        "POST", "/v1/vms", {"name": "warm-vm", "image": "kvstore", "memory": MEMORY, "backend": attack_world.backend}
    )
    try:
        assert host.vm_pid("warm-vm") == warm
        assert "--standby" in _cmdline(warm)
        assert not warm_dir.exists()  # its socket, pid file and log moved into the VM's directory
        assert (host.data_dir / "vms" / "warm-vm" / "control.sock").exists()
        assert host.api("POST", "/v1/vms/warm-vm/kv", {"op": "put", "key": "k", "value": "v"})["status"] == "OK"
        replacement, _ = _standby_pid(host, other_than=warm)
        assert replacement != warm
    finally:
        host.api("DELETE", "/v1/vms/warm-vm")


def test_a_standby_dies_with_its_daemon(attack_world: World) -> None:
    host = attack_world.extra_host("host-standby", pool="pool-a")
    pid, directory = _standby_pid(host)
    host.kill(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(pid), "the standby outlived its daemon"
    host.start()
    _standby_pid(host, other_than=pid)
    assert not directory.exists()  # the restarted daemon removed what the old one left
