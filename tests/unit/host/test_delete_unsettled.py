"""DELETE of a VM whose migration has not settled is refused (409) until it has; ``force=true`` stops it anyway.

While a migration is in flight only its outcome says which copy of the guest lives on: deleting the source while
the destination may still abort (or the destination while the source is frozen) could leave the VM running
nowhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cvmotion.errors import Conflict
from cvmotion.host.api import create_app
from cvmotion.host.daemon import HostConfig, HostDaemon
from cvmotion.host.store import UNSETTLED, VmRecord, VmState
from cvmotion.vmd.protocol import VmSpec


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[HostDaemon]:
    daemon = HostDaemon(HostConfig(name="h", data_dir=tmp_path, standby=False))
    try:
        yield daemon
    finally:
        daemon.stop()


def _vm(daemon: HostDaemon, state: VmState) -> VmRecord:
    record = VmRecord(name="a", spec=VmSpec(name="a", memory=16 << 20), state=state)
    daemon.vms["a"] = record
    return record


@pytest.mark.parametrize("state", sorted(UNSETTLED))
def test_an_unsettled_vm_is_not_deleted(daemon: HostDaemon, state: VmState) -> None:
    _vm(daemon, state)
    with pytest.raises(Conflict, match="has not settled"):
        daemon.delete_vm("a")
    assert daemon.vms["a"].state is state


def test_a_vm_whose_migration_holds_its_lock_is_not_deleted(daemon: HostDaemon) -> None:
    """Between ``migrate`` taking the VM and its state becoming MIGRATING, the lock already says so."""
    record = _vm(daemon, VmState.RUNNING)
    assert record.lock.acquire(blocking=False)
    try:
        with pytest.raises(Conflict, match="is migrating"):
            daemon.delete_vm("a")
    finally:
        record.lock.release()
    assert "a" in daemon.vms


@pytest.mark.parametrize("state", [VmState.MIGRATING, VmState.AWAITING_DESTINATION])
def test_force_deletes_it_anyway(daemon: HostDaemon, state: VmState) -> None:
    record = _vm(daemon, state)
    daemon.delete_vm("a", force=True)
    assert record.state is VmState.DELETED
    assert "a" not in daemon.vms


def test_a_settled_vm_is_deleted(daemon: HostDaemon) -> None:
    record = _vm(daemon, VmState.STOPPED)
    daemon.delete_vm("a")
    assert record.state is VmState.DELETED
    assert not record.lock.locked()


def test_the_api_answers_409_then_force_deletes(daemon: HostDaemon) -> None:
    _vm(daemon, VmState.AWAITING_DESTINATION)

    async def delete(params: dict[str, str]) -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(daemon))
        async with httpx.AsyncClient(transport=transport, base_url="http://host") as client:
            return await client.delete("/v1/vms/a", params=params)

    refused = asyncio.run(delete({}))
    assert refused.status_code == 409
    assert refused.json()["error"]["kind"] == "Conflict"
    assert "force=true" in refused.json()["error"]["message"]
    forced = asyncio.run(delete({"force": "true"}))
    assert forced.status_code == 200, forced.text
    assert forced.json() == {"deleted": "a"}
