"""Maintenance e2e fixtures: a real controller, the KDS and attestation service, and real host daemons.

Three hosts on loopback register with the controller (ha and hb in pool-a, hc in pool-b); their VMs
attest, so a move's attestation before and after are real tokens.  KVM when /dev/kvm is usable, else the
emulated backend (the hosts choose).  Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cvmotion.host.fabric import LocalFabric
from cvmotion.testing.controller import ControllerProcess

VMS = "/subscriptions/default/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines"
HOSTS = "/providers/Cvmotion.Fabric/hosts"
THREE_HOSTS = (("ha", "pool-a"), ("hb", "pool-a"), ("hc", "pool-b"))


class MaintenanceFleet:
    def __init__(self, root: Path, db: str | None = None, *, heartbeat_timeout: float = 4.0) -> None:
        self.root = root
        self.ctl = ControllerProcess(root / "ctl", db, heartbeat_timeout=heartbeat_timeout)
        self.fabric = LocalFabric(root / "fabric", pool="pool-a")
        self.env = dict(os.environ, CVMOTION_HOME=str(self.ctl.data_dir / "home"), CVMOTION_CONTROLLER=self.ctl.url)

    def start(self, hosts: tuple[tuple[str, str], ...] = THREE_HOSTS) -> None:
        self.ctl.start()
        self.fabric.start_services()
        token = self.cli_json("controller", "token", "create", "--data-dir", str(self.ctl.data_dir), "--role", "Host")
        extra = ["--controller", self.ctl.url, "--controller-token", token["token"], "--no-standby"]
        for name, pool in hosts:
            self.fabric.start_host(name, pool=pool, extra=extra)
        self.wait_hosts({name: "Available" for name, _ in hosts})

    def close(self) -> None:
        self.fabric.close()
        self.ctl.kill()
        # An in-place update replaces a host's daemon with a successor the fabric did not start: end every
        # process whose command line names this fleet's own directory (and nothing else).
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(self.root) in cmdline and "cvmotion" in cmdline:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(proc.name), signal.SIGKILL)

    def cli(self, *args: str, expect: int = 0, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "cvmotion", *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == expect, f"{args}: {done.returncode} {done.stdout[-2000:]} {done.stderr[-2000:]}"
        return done

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def api(self, method: str, path: str, body: Any = None) -> httpx.Response:
        return self.ctl.api(method, path, body)

    def host_api(self, host: str, method: str, path: str, body: Any = None) -> Any:
        return httpx.request(method, self.fabric.hosts[host].url + path, json=body, timeout=60).json()

    def wait_hosts(self, want: dict[str, str], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = {h["name"]: h["properties"]["state"] for h in self.api("GET", HOSTS).json()["value"]}
            if all(states.get(name) == state for name, state in want.items()):
                return
            time.sleep(0.2)
        raise AssertionError(f"hosts did not reach {want}: {states}")

    def create_vm(self, rg: str, name: str, *, image: str, clm: str, host: str) -> dict[str, Any]:
        body = {
            "location": "local",
            "properties": {
                "hardwareProfile": {"vmSize": "Standard_DC2as_v5"},
                "securityProfile": {"confidentialLiveMigration": clm},
                "storageProfile": {"imageReference": {"id": image}},
                "placement": {"host": host},
            },
        }
        response = self.api("PUT", f"{VMS.format(rg=rg)}/{name}", body)
        assert response.status_code == 202, response.text
        op = self.ctl.wait_operation(response.headers["Azure-AsyncOperation"], timeout=180)
        assert op["status"] == "Succeeded", op
        vm: dict[str, Any] = self.api("GET", f"{VMS.format(rg=rg)}/{name}").json()
        return vm

    def wait_attested(self, host: str, host_vm_name: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            att: dict[str, Any] = self.host_api(host, "GET", f"/v1/vms/{host_vm_name}/attestation")
            if att.get("jti"):
                return att
            time.sleep(0.2)
        raise AssertionError(f"{host_vm_name} on {host} did not attest")

    def wait_drain(self, host: str, timeout: float = 300.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        drain: dict[str, Any] = {}
        while time.monotonic() < deadline:
            drain = self.api("GET", f"{HOSTS}/{host}/drain").json()
            if drain.get("active") is False:
                return drain
            time.sleep(0.2)
        raise AssertionError(f"the drain of {host} did not end: {drain}")

    def events(self, prefix: str = "cvmotion.") -> list[dict[str, Any]]:
        answer = self.api("GET", "/providers/Cvmotion.Fabric/events?limit=1000").json()
        return [e for e in answer["value"] if str(e.get("type", "")).startswith(prefix)]


@pytest.fixture
def mfleet(tmp_path: Path) -> Iterator[MaintenanceFleet]:
    fleet = MaintenanceFleet(tmp_path)
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.close()
