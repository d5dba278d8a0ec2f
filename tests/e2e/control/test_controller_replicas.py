"""Two controller replicas on one PostgreSQL database: one leader (advisory lock), work claimed with
``FOR UPDATE SKIP LOCKED`` (no operation done twice), and a replica SIGKILLed mid-operation replaced by the
other (its lease runs out, the survivor claims the operation and finishes it; it also takes the lead)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from cvmotion.testing.controller import ControllerProcess
from cvmotion.testing.fakehost import FakeHost
from cvmotion.testing.postgres import PostgresServer

RG = "/subscriptions/default/resourceGroups/rg1/providers/Microsoft.Compute/virtualMachines"


def _body(host: str | None = None) -> dict[str, object]:
    props: dict[str, object] = {
        "hardwareProfile": {"vmSize": "Standard_DC2as_v5"},
        "storageProfile": {"imageReference": {"id": "kvstore"}},
    }
    if host:
        props["placement"] = {"host": host}
    return {"properties": props}


def _leaders(*ctls: ControllerProcess, timeout: float = 20.0, want: int = 1) -> list[ControllerProcess]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        leading = [c for c in ctls if httpx.get(c.url + "/healthz", timeout=5).json()["leader"]]
        if len(leading) == want:
            return leading
        time.sleep(0.1)
    raise AssertionError("the replicas did not settle on one leader")


def test_replicas_share_work_and_survive_sigkill(
    postgres: PostgresServer, tmp_path: Path, fakehosts: dict[str, FakeHost]
) -> None:
    db = postgres.database()
    fault = tmp_path / "kill-at"
    env = {"CVMOTION_FAULT_KILL_FILE": str(fault)}
    a = ControllerProcess(tmp_path / "a", db, env=env).start()
    b = ControllerProcess(tmp_path / "b", db, env=env).start()
    try:
        for host in fakehosts.values():
            assert a.api("POST", "/providers/Cvmotion.Fabric/hosts/register", host.registration()).status_code == 200
        [leader] = _leaders(a, b)

        # Twenty creates through both replicas: each VM exists exactly once.
        ops = []
        for i in range(20):
            ctl = a if i % 2 else b
            response = ctl.api("PUT", f"{RG}/vm{i}", _body(), token=a.owner_token)
            assert response.status_code == 202, response.text
            ops.append(response.headers["Azure-AsyncOperation"])
        assert all(a.wait_operation(op)["status"] == "Succeeded" for op in ops)
        copies = [vm for h in fakehosts.values() for vm in h.vms]
        assert len(copies) == len(set(copies)) == 20

        # Whichever replica claims the next create dies right after committing its HostRequested step.
        fault.write_text("Create:HostRequested")
        try:
            response = leader.api("PUT", f"{RG}/late", _body("h1"), token=a.owner_token)
        except httpx.TransportError:
            response = None
        deadline = time.monotonic() + 30
        while all(c.proc is not None and c.proc.poll() is None for c in (a, b)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not fault.exists()
        dead, alive = (a, b) if a.proc is not None and a.proc.poll() is not None else (b, a)
        assert dead.wait_exit() == -9
        [op] = [o for o in alive.api("GET", f"{RG}/late/operations", token=a.owner_token).json()["value"]]
        assert (
            alive.wait_operation(f"/subscriptions/default/providers/Cvmotion.Fabric/operations/{op['id']}")["status"]
            == "Succeeded"
        )
        assert [vm for vm in fakehosts["h1"].vms if vm.startswith("late-")] != []
        assert sum(vm.startswith("late-") for h in fakehosts.values() for vm in h.vms) == 1
        assert _leaders(alive) == [alive]  # the survivor leads (the dead one's advisory lock went with it)
        del response
    finally:
        a.kill()
        b.kill()


def test_two_replicas_never_overfill_a_host(
    postgres: PostgresServer, tmp_path: Path, fakehosts: dict[str, FakeHost]
) -> None:
    """Concurrent placements through both replicas: a host with room for four VMs gets exactly four."""
    from concurrent.futures import ThreadPoolExecutor

    db = postgres.database()
    a = ControllerProcess(tmp_path / "a", db).start()
    b = ControllerProcess(tmp_path / "b", db).start()
    try:
        small = fakehosts["h1"].registration(vcpus=8, memory_gib=64)  # four Standard_DC2as_v5
        assert a.api("POST", "/providers/Cvmotion.Fabric/hosts/register", small).status_code == 200

        def put(i: int) -> int:
            ctl = a if i % 2 else b
            return ctl.api("PUT", f"{RG}/c{i}", _body("h1"), token=a.owner_token).status_code

        with ThreadPoolExecutor(12) as pool:
            codes = sorted(pool.map(put, range(12)))
        assert codes == [202] * 4 + [409] * 8
    finally:
        a.kill()
        b.kill()
