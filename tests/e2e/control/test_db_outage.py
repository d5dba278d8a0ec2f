"""A PostgreSQL server that goes away while operations are in flight and requests arrive, then comes back.

A real ``cvmotion controller serve`` on a real PostgreSQL server (``pg_ctl stop -m immediate``: every
connection cut, as a crash of the database does), hosts simulated by the host API contract.  While the
database is down every request is answered at once with 503 and a JSON ``DatabaseUnavailable`` body (no
traceback, no hang); once it is back the controller serves again without a restart, every accepted
operation settles, and each VM runs on exactly one host: none lost, none created twice.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from cvmotion.testing.controller import ControllerProcess
from cvmotion.testing.fakehost import FakeHost
from cvmotion.testing.postgres import PostgresServer

RG = "/subscriptions/default/resourceGroups/rg1"
VMS = f"{RG}/providers/Microsoft.Compute/virtualMachines"
BODY = {
    "properties": {
        "hardwareProfile": {"vmSize": "Standard_DC2as_v5"},
        "securityProfile": {"confidentialLiveMigration": "Enabled"},
        "storageProfile": {"imageReference": {"id": "kvstore"}},
    }
}
ANSWER_S = 20.0  # no request may take longer than this, database or not
SETTLE_S = 90.0


class Load:
    """Clients that create VMs back to back and record every answer (name, status, body, seconds)."""

    def __init__(self, ctl: ControllerProcess, clients: int) -> None:
        self.ctl = ctl
        self.answers: list[tuple[str, int, Any, float]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(clients)]

    def _run(self, k: int) -> None:
        headers = {"Authorization": f"Bearer {self.ctl.owner_token}"}
        with httpx.Client(base_url=self.ctl.url, headers=headers, timeout=ANSWER_S + 10) as http:
            j = 0
            while not self.stop.is_set():
                j += 1
                name = f"c{k}-{j}"
                t0 = time.monotonic()
                try:
                    response = http.put(f"{VMS}/{name}", json=BODY)
                    status, body = response.status_code, _json(response)
                except httpx.TransportError as exc:
                    status, body = 0, repr(exc)
                with self.lock:
                    self.answers.append((name, status, body, time.monotonic() - t0))
                if status == 503:
                    self.stop.wait(0.05)  # a client that was told to retry does, a little later

    def count(self, status: int) -> int:
        with self.lock:
            return sum(a[1] == status for a in self.answers)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(ANSWER_S + 15)


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def _until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.05)


def _unavailable(status: int, body: Any) -> bool:
    return status == 503 and isinstance(body, dict) and body["error"]["code"] == "DatabaseUnavailable"


def test_database_goes_away_mid_operation(tmp_path: Path, fakehosts: dict[str, FakeHost]) -> None:
    server = PostgresServer.find()
    if server is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) are not installed")
    with server:
        ctl = ControllerProcess(tmp_path / "ctl", server.database(), lease=1.0)
        ctl.start()
        try:
            for host in fakehosts.values():
                assert ctl.api("POST", "/providers/Cvmotion.Fabric/hosts/register", host.registration()).is_success
            settled = ctl.api("PUT", f"{VMS}/settled", BODY)
            assert ctl.wait_operation(settled.headers["Azure-AsyncOperation"])["status"] == "Succeeded"

            with Load(ctl, clients=3) as load:
                _until(lambda: load.count(202) >= 6, 60, "creates accepted before the outage")
                moving = ctl.api("POST", f"{VMS}/settled/migrate", {})  # a move in flight too
                assert moving.status_code == 202, moving.text
                server.halt()
                down_at = time.monotonic()
                # Long enough that the workers' claims and steps fail too, and retry with backoff.
                _until(lambda: load.count(503) >= 30, 60, "503s while the database is down")
                during = {
                    "GET": ctl.api("GET", f"{VMS}/settled"),
                    "LIST": ctl.api("GET", VMS),
                    "OPERATION": ctl.api("GET", "/" + moving.headers["Azure-AsyncOperation"].split("/", 3)[3]),
                }
                assert time.monotonic() - down_at < 60
                server.resume()
                before = load.count(202)
                _until(lambda: load.count(202) >= before + 6, 60, "creates accepted after the database came back")

            answers = load.answers
            assert all(a[3] < ANSWER_S for a in answers), max(a[3] for a in answers)  # no hang
            odd = [a for a in answers if a[1] != 202 and not _unavailable(a[1], a[2])]
            assert not odd, odd[:3]  # 202, or 503 DatabaseUnavailable: never a 500, never a traceback
            assert all("Traceback" not in str(a[2]) for a in answers)
            for kind, response in during.items():
                assert _unavailable(response.status_code, _json(response)), (kind, response.text)
                assert response.headers["Retry-After"] == "1", kind

            assert ctl.api("GET", "/healthz").status_code == 200  # the same process serves again
            assert ctl.wait_operation(moving.headers["Azure-AsyncOperation"], SETTLE_S)["status"] == "Succeeded"
            accepted = {a[0] for a in answers if a[1] == 202} | {"settled"}
            for name in accepted:
                op = ctl.wait_operation(_op_path(ctl, name), SETTLE_S)
                assert op["status"] == "Succeeded", (name, op)
            listed = {v["name"]: v for v in ctl.api("GET", VMS).json()["value"]}
            # A 503 at the commit itself may still have committed (the answer was lost, not the write):
            # such a VM is then a whole one, settled like any other.
            assert accepted <= set(listed), accepted - set(listed)
            for name in listed:
                _until(
                    lambda n=name: (
                        ctl.api("GET", f"{VMS}/{n}").json()["properties"]["provisioningState"] == "Succeeded"
                    ),
                    SETTLE_S,
                    f"{name} settles",
                )
            copies: dict[str, list[str]] = {}
            for host_name, fake in fakehosts.items():
                for host_vm in fake.vms:
                    copies.setdefault(host_vm, []).append(host_name)
            for name in listed:
                shown = ctl.api("GET", f"{VMS}/{name}").json()["properties"]["instanceView"]
                assert copies.get(shown["hostVmName"]) == [shown["host"]], (name, copies.get(shown["hostVmName"]))
            assert len(copies) == len(listed), set(copies) - {
                ctl.api("GET", f"{VMS}/{n}").json()["properties"]["instanceView"]["hostVmName"] for n in listed
            }  # nothing runs that the controller does not know
            assert copies.get(_host_name(ctl, "settled")) == ["h2"]  # moved once, to h2
        finally:
            ctl.kill()


def _op_path(ctl: ControllerProcess, name: str) -> str:
    [latest, *_] = ctl.api("GET", f"{VMS}/{name}/operations").json()["value"]
    return f"/subscriptions/default/providers/Cvmotion.Fabric/operations/{latest['id']}"


def _host_name(ctl: ControllerProcess, name: str) -> str:
    return str(ctl.api("GET", f"{VMS}/{name}").json()["properties"]["instanceView"]["hostVmName"])
