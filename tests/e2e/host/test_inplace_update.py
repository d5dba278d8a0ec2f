"""Memory-preserving update in place, end to end: real processes on loopback (KDS, attestation service, a host).

A kvstore VM under client writes; ``POST /v1/host/maintenance`` replaces the host daemon and the platform
process under it (their PIDs change, the VM process's does not); every acknowledged write is still there, the
pause the VM process measured is under a second, the guest re-attested on the restarted secure processor, and
the guest read a Freeze event through its cvm-io mailbox and approved it.  The VMs run on KVM where /dev/kvm is
usable and on the emulated backend otherwise (``CVMOTION_E2E_BACKEND`` forces one).
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from cvmotion.testing.canary import GuestMemoryTap, scan_process, scan_tree, secrets_canaries
from cvmotion.testing.hosts import ApiError, HostProcess, pid_alive
from cvmotion.vmm.kvm import kvm_usable

VM = "kv1"
CLI = [sys.executable, "-m", "cvmotion"]


def _backend() -> str:
    forced = os.environ.get("CVMOTION_E2E_BACKEND", "")
    return forced or ("kvm" if kvm_usable()[0] else "emulated")


class _Served:
    """A ``cvmotion ... serve`` process; its URL is the last word of the line it prints once it listens."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            ready = sel.select(timeout=60)
        line = self.proc.stdout.readline() if ready else ""
        if " on http" not in line and "listening on" not in line:
            self.close()
            pytest.fail(f"{args[:2]} did not start: {line!r}")
        self.url = line.split()[-1]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostProcess]:
    base = tmp_path_factory.mktemp("inplace")
    vendor, data = base / "vendor", base / "host"
    made = subprocess.run(
        [*CLI, "platform", "create", "--data-dir", str(data), "--vendor-dir", str(vendor)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    kds = _Served("kds", "serve", "--vendor-dir", str(vendor), "--listen", "127.0.0.1:0")
    att = _Served(
        "attestation", "serve", "--data-dir", str(base / "att"), "--listen", "127.0.0.1:0",
        "--emulated-vendor-dir", str(vendor), "--kds", kds.url,
    )  # fmt: skip
    h = HostProcess("host-m", data, vendor, base / "pool-ca", extra_args=("--attestation", att.url))
    try:
        yield h.start()
    finally:
        h.close()
        att.close()
        kds.close()


def _daemon_pid(host: HostProcess) -> int:
    return int((host.data_dir / "daemon.pid").read_text())


def _wait(what: str, probe: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        with _quiet():
            value = probe()
            if value:
                return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.05)


class _quiet:
    """Connection refused while the daemon hands over counts as "not yet"."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> bool:
        return kind is not None and issubclass(kind, httpx.TransportError)


class Writer:
    """A client putting keys while the host updates under the VM; what the host acknowledged is recorded."""

    def __init__(self, host: HostProcess) -> None:
        self.host = host
        self.acked: dict[str, str] = {}
        self.count = 0
        self.failed = 0
        self.last_error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            # 500 keys written over and over: the latest acknowledged value of each must be the one read back.
            key, value = f"k{i % 500}", f"v{i}-" + "x" * (i % 50)
            try:
                body = {"op": "put", "key": key, "value": value}
                answer = self.host.api("POST", f"/v1/vms/{VM}/kv", body, timeout=10)
                if answer.get("status") == "OK":
                    self.acked[key] = value
                    self.count += 1
                i += 1
            except (ApiError, httpx.TransportError) as exc:
                self.failed += 1
                self.last_error = repr(exc)
                time.sleep(0.01)

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)


def _freeze(incarnation: int, status: str) -> dict[str, Any]:
    not_before = format_datetime(datetime.now(UTC) + timedelta(minutes=5), usegmt=True)
    return {
        "DocumentIncarnation": incarnation,
        "Events": [
            {
                "EventId": "freeze-1",
                "EventType": "Freeze",
                "ResourceType": "VirtualMachine",
                "Resources": [VM],
                "EventStatus": status,
                "NotBefore": not_before if status == "Scheduled" else "",
                "Description": "host software update, memory preserved",
                "EventSource": "Platform",
                "DurationInSeconds": 1,
            }
        ],
    }


def test_memory_preserving_update_in_place(host: HostProcess) -> None:
    body = {"name": VM, "image": "kvstore", "memory": 16 << 20, "cmdline": "hb_ms=200 se_ms=50", "backend": _backend()}
    host.api("POST", "/v1/vms", body)
    before = _wait("the first attestation", lambda: host.api("GET", f"/v1/vms/{VM}/attestation").get("jti"), 60)
    # The guest reads the Freeze event through its mailbox and approves it.
    host.api("PUT", f"/v1/vms/{VM}/scheduledevents", _freeze(1, "Scheduled"))
    approved = _wait(
        "the guest's approval",
        lambda: host.api("GET", f"/v1/vms/{VM}/scheduledevents")["startRequests"],
        30,
    )
    assert approved == ["freeze-1"]
    assert host.api("GET", f"/v1/vms/{VM}/metadata/scheduledevents")["DocumentIncarnation"] == 1
    pids = (_daemon_pid(host), host.platform_pid(), host.vm_pid(VM))
    assert pids[2] is not None
    with GuestMemoryTap(pids[2], 16 << 20) as tap:
        vmpcks = secrets_canaries(tap)  # the guest's keys: in the sealed SP state, never in the clear
    with Writer(host) as writer:
        _wait("writes before the update", lambda: writer.count >= 20, 60)
        request = {"id": "upd-1", "kind": "MemoryPreservingUpdate"}
        started = host.api("POST", "/v1/host/maintenance", request)
        assert started == {"id": "upd-1", "kind": "MemoryPreservingUpdate", "status": "InProgress"}
        done = _wait(
            "the update",
            lambda: (r := host.api("GET", "/v1/host/maintenance/upd-1"))["status"] != "InProgress" and r,
            180,
        )
        acked_during = writer.count
        try:
            _wait("writes after the update", lambda: writer.count >= acked_during + 20, 60)
        except AssertionError:
            raise AssertionError(f"{writer.count} {writer.failed} {writer.last_error}") from None
    assert done["status"] == "Succeeded", done
    assert done["platformRestarted"]
    assert done["daemonRestarted"]
    (vm,) = done["vms"]
    assert (vm["name"], vm["outcome"], vm["reattested"]) == (VM, "Succeeded", True), vm
    assert 0 < vm["pauseMs"] < 1000, vm
    daemon, platform, vm_pid = pids
    assert _daemon_pid(host) != daemon
    assert not pid_alive(daemon)
    assert host.platform_pid() != platform
    assert not pid_alive(platform)
    assert host.vm_pid(VM) == vm_pid
    assert not scan_tree(host.data_dir, vmpcks), "guest keys in the data directory"
    assert not scan_process(_daemon_pid(host), vmpcks).hits, "guest keys in the new daemon's memory"
    # Every acknowledged write is still there.
    for key, value in writer.acked.items():
        got = host.api("POST", f"/v1/vms/{VM}/kv", {"op": "get", "key": key})
        assert got.get("value") == value, key
    # The guest's attestation continued on the restarted secure processor (its channel's sequence numbers too).
    after = host.api("GET", f"/v1/vms/{VM}/attestation")
    assert after["jti"] != before
    assert after["chip_id"]
    # The same id answers the same record; the record survived the daemon's restart.
    assert host.api("POST", "/v1/host/maintenance", request)["status"] == "Succeeded"
    with pytest.raises(ApiError) as err:
        host.api("GET", "/v1/host/maintenance/nope")
    assert err.value.status == 404
    # The event starts, then leaves the document; the incarnation never goes back.
    host.api("PUT", f"/v1/vms/{VM}/scheduledevents", _freeze(2, "Started"))
    host.api("PUT", f"/v1/vms/{VM}/scheduledevents", {"DocumentIncarnation": 3, "Events": []})
    with pytest.raises(ApiError) as err:
        host.api("PUT", f"/v1/vms/{VM}/scheduledevents", _freeze(2, "Started"))
    assert err.value.status == 409
    with pytest.raises(ApiError) as err:
        host.api("POST", f"/v1/vms/{VM}/metadata/scheduledevents", {"StartRequests": [{"EventId": "freeze-1"}]})
    assert err.value.status == 400
    assert host.api("GET", f"/v1/vms/{VM}/scheduledevents") == {
        "document": {"DocumentIncarnation": 3, "Events": []},
        "startRequests": [],
    }


_ = Path


@pytest.mark.slow  # a daemon restart on top of the update test (~20 s here): kept out of the default suite's budget
def test_a_platform_that_crashed_does_not_get_its_guests_back(host: HostProcess) -> None:
    """Nothing sealed (a crash, not an update): the VM's hardware re-attaches to the next platform process, which
    holds no guest for it, so the VM stops instead of running a guest whose secure-processor context is gone."""
    body = {"name": "kv2", "image": "kvstore", "memory": 16 << 20, "backend": _backend()}
    host.api("POST", "/v1/vms", body)
    vm_pid = host.vm_pid("kv2")
    assert vm_pid is not None
    os.kill(host.platform_pid(), signal.SIGKILL)
    os.kill(_daemon_pid(host), signal.SIGKILL)  # and the daemon: the next one starts a platform (a fresh SP)
    host.kill()
    host.start()
    _wait("the orphaned VM to stop", lambda: not pid_alive(vm_pid), 90)
    host.api("POST", "/v1/vms", body | {"name": "kv3"})
    assert host.api("POST", "/v1/vms/kv3/kv", {"op": "put", "key": "k", "value": "v"})["status"] == "OK"
    assert not list(host.data_dir.glob("sp-state.sealed*"))
