"""The platform process's command boundary, in-process: each client role sends only its own commands, and a VM
process feeds dirty pages only for the VM it attached (the SP's "exported and clean" view is not the host's to
shape through another VM's connection)."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cvmotion.agent.platform import PlatformService
from cvmotion.errors import UsageError
from cvmotion.firmware.vendor import Vendor
from cvmotion.ipc.rpc import Endpoint
from cvmotion.vmm.memory import GuestMemory

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "protocol"))
from mig_harness import new_sp  # noqa: E402

pytestmark = pytest.mark.timeout(60)

MEMORY = 4 << 20


class _Platform:
    def __init__(self, service: PlatformService) -> None:
        self.service = service
        self.endpoints: list[Endpoint] = []
        self.memories: list[GuestMemory] = []

    def connect(self) -> Endpoint:
        ours, theirs = socket.socketpair()
        self.endpoints.append(self.service.accept(theirs))
        client = Endpoint(ours, name="test-client")
        self.endpoints.append(client)
        return client

    def vm(self, name: str) -> Endpoint:
        """A VM process's connection that attached ``name``'s memory."""
        client = self.connect()
        memory = GuestMemory(MEMORY, name=f"test-{name}")
        self.memories.append(memory)
        client.call("vm_attach", {"name": name, "memory": MEMORY, "mode": "launch"}, fds=[memory.fd])
        return client

    def close(self) -> None:
        for endpoint in self.endpoints:
            endpoint.close()
        for memory in self.memories:
            memory.close()


@pytest.fixture
def platform(emulated_vendor: Vendor, tmp_path: Path) -> Iterator[_Platform]:
    p = _Platform(PlatformService(new_sp(emulated_vendor, tmp_path / "sp"), verify_vm_peers=False))
    try:
        yield p
    finally:
        p.close()


def test_a_host_cannot_attach_a_vms_hardware(platform: _Platform) -> None:
    host = platform.connect()
    host.call("host_hello")
    memory = GuestMemory(MEMORY, name="test-evil")
    platform.memories.append(memory)
    with pytest.raises(UsageError, match="not a command this client may send"):
        host.call("vm_attach", {"name": "victim", "memory": MEMORY, "mode": "launch"}, fds=[memory.fd])
    assert "victim" not in platform.service.hardware


@pytest.mark.parametrize("method", ["status", "ext_certs", "launch", "export_start", "decommission"])
def test_a_vm_process_cannot_send_host_commands(platform: _Platform, method: str) -> None:
    vm = platform.vm("a")
    with pytest.raises(UsageError, match="not a command this client may send"):
        vm.call(method, {})


def test_the_first_command_names_the_role(platform: _Platform) -> None:
    with pytest.raises(UsageError, match="host_hello or vm_attach first"):
        platform.connect().call("status")


def test_dirty_pages_only_for_the_vm_a_connection_attached(platform: _Platform) -> None:
    platform.vm("a")
    other = platform.vm("b")
    gfns = np.asarray([0x200], dtype="<u8").tobytes()
    other.call("vm_dirty", {"name": "b"}, gfns)  # its own VM: accepted
    with pytest.raises(UsageError, match="did not attach that VM"):
        other.call("vm_dirty", {"name": "a"}, gfns)
    assert platform.service.hardware["a"].take_dirty(fresh=False).tolist() == []
    assert platform.service.hardware["b"].take_dirty(fresh=False).tolist() == [0x200]


def test_pending_dirty_harvests_stay_bounded(platform: _Platform) -> None:
    """A daemon harvesting in a loop with no export running cannot grow the platform's memory without bound:
    pending harvests fold into the guest's distinct pages, and none is lost."""
    vm = platform.vm("a")
    for i in range(200):
        vm.call("vm_dirty", {"name": "a"}, np.asarray([0x200 + i % 7, 0x300], dtype="<u8").tobytes())
    hw = platform.service.hardware["a"]
    assert len(hw._dirty) <= 33
    assert sum(len(part) for part in hw._dirty) < 200
    assert hw.take_dirty(fresh=False).tolist() == [*range(0x200, 0x207), 0x300]
