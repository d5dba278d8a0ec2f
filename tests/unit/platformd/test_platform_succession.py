"""platformd.succession: the platform process replaced under running VMs, in-process and as the attacker would.

A VM's guest comes back bound to its hardware only for the VM process holding the hardware token the previous
platform gave it; a replayed or tampered sealed state is refused (kept aside, no guests); the old MA's context is
gone; the sealed SP refuses everything.
"""

from __future__ import annotations

import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmotion.errors import FirmwareError, UsageError
from cvmotion.firmware.kds import Kds
from cvmotion.firmware.sp_seal import SEALED_FILE
from cvmotion.firmware.vendor import Vendor
from cvmotion.ipc.rpc import ChannelClosed, Endpoint
from cvmotion.platformd.server import PlatformService
from cvmotion.platformd.succession import REFUSED_SUFFIX, open_sealed_state
from cvmotion.vmm.memory import GuestMemory

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "protocol"))
from mig_harness import new_sp  # noqa: E402

pytestmark = pytest.mark.timeout(60)

MEMORY = 4 << 20
RANGES = [[0x100000, 0x1000]]


class _Host:
    """A platform service and the connections made to it (host daemon, VM processes)."""

    def __init__(self, service: PlatformService) -> None:
        self.service = service
        self.sealed = False
        service.on_sealed = self._sealed
        self.endpoints: list[Endpoint] = []

    def _sealed(self) -> None:
        self.sealed = True

    def connect(self) -> Endpoint:
        ours, theirs = socket.socketpair()
        self.endpoints.append(self.service.accept(theirs))
        client = Endpoint(ours, name="test-client")
        self.endpoints.append(client)
        return client

    def host(self) -> Endpoint:
        host = self.connect()
        host.call("host_hello")
        return host

    def attach(self, name: str, memory: GuestMemory, reattach: str | None = None) -> tuple[Endpoint, str]:
        vm = self.connect()
        args: dict[str, object] = {"name": name, "memory": MEMORY, "mode": "launch"}
        if reattach is not None:
            args["reattach"] = reattach
        result, _, _ = vm.call("vm_attach", args, fds=[memory.fd])
        return vm, str(result["token"])

    def close(self) -> None:
        for endpoint in self.endpoints:
            endpoint.close()


@pytest.fixture
def world(emulated_vendor: Vendor, tmp_path: Path) -> Iterator[tuple[_Host, GuestMemory, Path]]:
    sp = new_sp(emulated_vendor, tmp_path / "sp")
    first = _Host(PlatformService(sp, verify_vm_peers=False))
    memory = GuestMemory(MEMORY, name="test-vm")
    try:
        yield first, memory, tmp_path / "sp"
    finally:
        first.close()
        memory.close()


def _next(data_dir: Path, vendor: Vendor) -> _Host:
    opened = open_sealed_state(data_dir, Kds(vendor))
    assert opened is not None
    sp, bindings = opened
    service = PlatformService(sp, verify_vm_peers=False)
    service.adopt(bindings)
    return _Host(service)


def _launch_and_seal(first: _Host, memory: GuestMemory) -> tuple[int, str]:
    vm, token = first.attach("v1", memory)
    host = first.host()
    handle = int(
        host.call("launch", {"vm": "v1", "policy": 0x30000, "ranges": RANGES, "host_data": "00" * 32})[0]["handle"]
    )
    assert vm.call("can_run", {"handle": handle})[0]["can_run"] is True
    host.call("seal_state")
    assert first.sealed
    return handle, token


def test_the_vm_process_with_its_token_gets_its_guest_back(
    world: tuple[_Host, GuestMemory, Path], emulated_vendor: Vendor
) -> None:
    first, memory, data_dir = world
    handle, token = _launch_and_seal(first, memory)
    # The sealed SP refuses everything, whoever asks.
    with pytest.raises(FirmwareError):
        first.host().call("guest_info", {"handle": handle})
    assert not (data_dir / SEALED_FILE).read_bytes().count(bytes.fromhex(token))
    second = _next(data_dir, emulated_vendor)
    try:
        assert not (data_dir / SEALED_FILE).exists()  # opened once, gone
        vm, new_token = second.attach("v1", memory, reattach=token)
        assert new_token == token
        assert vm.call("can_run", {"handle": handle})[0]["can_run"] is True
        host = second.host()
        assert host.call("guest_info", {"handle": handle})[0]["op_state"] == "RUNNABLE"
        with pytest.raises(FirmwareError, match="served a guest already"):
            host.call("launch", {"vm": "v1", "policy": 0x30000, "ranges": RANGES, "host_data": "00" * 32})
    finally:
        second.close()


@pytest.mark.parametrize("token", ["00" * 32, "zz", None], ids=["wrong", "malformed", "fresh-attach"])
def test_without_the_token_no_guest(
    world: tuple[_Host, GuestMemory, Path], emulated_vendor: Vendor, token: str | None
) -> None:
    first, memory, data_dir = world
    handle, _ = _launch_and_seal(first, memory)
    second = _next(data_dir, emulated_vendor)
    other = GuestMemory(MEMORY, name="test-impostor")
    try:
        vm, _ = second.attach("v1", other, reattach=token)
        assert vm.call("can_run", {"handle": handle})[0]["can_run"] is False
        if token is not None:  # it claimed to be re-attaching hardware: never launchable
            with pytest.raises(FirmwareError, match="served a guest already"):
                second.host().call("launch", {"vm": "v1", "policy": 0x30000, "ranges": RANGES, "host_data": "00" * 32})
    finally:
        second.close()
        other.close()


@pytest.mark.parametrize("how", ["replayed", "tampered"])
def test_a_replayed_or_tampered_state_is_refused(
    world: tuple[_Host, GuestMemory, Path], emulated_vendor: Vendor, how: str
) -> None:
    first, memory, data_dir = world
    _launch_and_seal(first, memory)
    path = data_dir / SEALED_FILE
    kept = path.read_bytes()
    if how == "replayed":
        second = _next(data_dir, emulated_vendor)  # the genuine successor opens it
        second.close()
        path.write_bytes(kept)  # the host puts the same bytes back for another platform process
    else:
        path.write_bytes(kept[:-1] + bytes([kept[-1] ^ 1]))
    assert open_sealed_state(data_dir, Kds(emulated_vendor)) is None
    assert not path.exists()
    assert (data_dir / (SEALED_FILE + REFUSED_SUFFIX)).exists()


def test_seal_refused_leaves_the_platform_serving(world: tuple[_Host, GuestMemory, Path]) -> None:
    first, memory, _ = world
    first.attach("v1", memory)
    host = first.host()
    first.service.sp.launch_start(0x30000)  # a launch half done
    with pytest.raises(FirmwareError):
        host.call("seal_state")
    assert not first.sealed
    assert host.call("status")[0]["guests"] == 1


_ = (ChannelClosed, UsageError, shutil)
