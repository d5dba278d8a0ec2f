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

from cvmotion.errors import FirmwareError, UsageError
from cvmotion.firmware.vendor import Vendor
from cvmotion.ipc.rpc import Endpoint
from cvmotion.platformd.server import PlatformService
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


def _host(platform: _Platform) -> Endpoint:
    host = platform.connect()
    host.call("host_hello")
    return host


def _launch(host: Endpoint, vm: str, ranges: list[list[int]]) -> int:
    args = {"vm": vm, "policy": 0x70000, "ranges": ranges, "host_data": "00" * 32}
    return int(host.call("launch", args)[0]["handle"])


def test_hardware_serves_one_guest(platform: _Platform) -> None:
    """A second LAUNCH over hardware that ran a guest would be a new context over its memory (a fork, and a
    measurement oracle over its pages): refused, whatever the ranges."""
    platform.vm("a")
    host = _host(platform)
    _launch(host, "a", [[0x100000, 0x1000]])
    for ranges in ([[0x100000, 0x1000]], [[0x200000, 0x2000]]):
        with pytest.raises(FirmwareError, match="served a guest already"):
            _launch(host, "a", ranges)


@pytest.mark.parametrize(
    "ranges",
    [[[0x7000, 0x1000]], [[0x6000, 0x3000]], [[0x1001, 0x1000]], [[0x100000, 0]], [[0, MEMORY * 2]], [], "x"],
    ids=["secrets", "over-secrets", "unaligned", "empty-range", "beyond-ram", "none", "not-a-list"],
)
def test_launch_ranges_are_checked_before_anything_is_claimed(platform: _Platform, ranges: object) -> None:
    platform.vm("a")
    host = _host(platform)
    with pytest.raises(FirmwareError):
        host.call("launch", {"vm": "a", "policy": 0x70000, "ranges": ranges, "host_data": "00" * 32})
    _launch(host, "a", [[0x100000, 0x1000]])  # nothing was claimed by the refused calls


def test_host_commands_name_only_vm_guests(platform: _Platform) -> None:
    """The MA's own context, or any handle not bound to attached VM hardware, is not the host's to touch."""
    platform.vm("a")
    host = _host(platform)
    mine = _launch(host, "a", [[0x100000, 0x1000]])
    stranger = platform.service.sp.launch_start(0x30000)  # a context no VM hardware runs (as the MA's)
    for method in ("decommission", "guest_info", "guest_request", "can_run", "export_start", "export_status"):
        with pytest.raises(FirmwareError, match="no VM guest"):
            host.call(method, {"handle": int(stranger), "vm": "a"})
    assert host.call("guest_info", {"handle": mine})[0]["op_state"] == "RUNNABLE"


def test_each_role_has_exactly_one_handler_per_command_of_its_enum(platform: _Platform) -> None:
    """The enums are the allowlists: a command in an enum has a handler, and nothing else has one."""
    from cvmotion.platformd.protocol import HostCommand, VmProcessCommand

    service = platform.service
    assert set(service._host_table) == {c.value for c in HostCommand}
    # vm_attach is the VM role's first command (it names the role), served before the table.
    assert set(service._vm_table) == {c.value for c in VmProcessCommand} - {VmProcessCommand.VM_ATTACH.value}
