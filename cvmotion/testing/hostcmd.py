"""testing: the adversarial hypervisor at its own command interfaces (what a malicious host daemon can send).

The host daemon is untrusted; it holds two command interfaces to the "hardware" of its host, and a
malicious one can say anything on them:

- ``platform.sock`` as a *host* client (``host_hello`` first): the SNP command interface and the migration
  commands (``platformd.protocol.HostCommand``, MA relay included); every ``ma_*`` firmware call and every
  VM-only method must be refused;
- a VM's ``control.sock`` (run control: ``bind``, ``resume``, ``start``, ``throttle``...): the VM process is
  hardware and asks the secure processor ``can_run`` before any vCPU runs;
- ``platform.sock`` as a *VM* client (``vm_attach`` with a memfd it made): impersonating a VM's hardware.

``HostCommands`` drives them directly; ``forge_abort_token`` builds a syntactically valid abort token under a
key the attacker chose (the firmware must reject it: only K_b, inside the TEE, makes real ones).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cvmotion.abi import wire
from cvmotion.abi.wire import BundleHeader, BundleType
from cvmotion.ipc.rpc import Endpoint, connect_unix
from cvmotion.vmm.memory import GuestMemory

__all__ = ["HostCommands", "forge_abort_token"]


def forge_abort_token(session_id: bytes, key: bytes | None = None) -> bytes:
    """An ABORT_TOKEN bundle for ``session_id`` MAC'd under ``key`` (default: a fresh random key)."""
    meta = wire.pack_abort_token_metadata(session_id, 1)
    size = wire.HEADER_SIZE + len(meta) + wire.MAC_SIZE
    head = BundleHeader(
        size=size, stream=wire.BACKWARD_STREAM, type=BundleType.ABORT_TOKEN, mb_counter=0, epoch=0, iv_counter=0
    ).to_bytes()
    mac = AESGCM(key or os.urandom(32)).encrypt(wire.gcm_iv(0, wire.BACKWARD_STREAM), b"", head + meta)
    return head + meta + mac


class HostCommands:
    """A malicious daemon's direct line to one host's platform process and VM processes."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._endpoints: list[Endpoint] = []
        self._memories: list[GuestMemory] = []

    def _connect(self, path: Path, name: str) -> Endpoint:
        endpoint = connect_unix(str(path), name=name)
        self._endpoints.append(endpoint)
        return endpoint

    def platform(self) -> Endpoint:
        """A host-role connection to the platform process."""
        endpoint = self._connect(self.data_dir / "platform.sock", "evil-host->platform")
        endpoint.call("host_hello")
        return endpoint

    def platform_call(self, method: str, args: dict[str, Any] | None = None, blob: bytes = b"") -> Any:
        return self.platform().call(method, args or {}, blob)

    def vm(self, name: str) -> Endpoint:
        """A second control connection to a VM process (the VM process serves several)."""
        return self._connect(self.data_dir / "vms" / name / "control.sock", f"evil-host->vm-{name}")

    def vm_call(self, name: str, method: str, args: dict[str, Any] | None = None) -> Any:
        return self.vm(name).call(method, args or {})

    def platform_as_vm(self) -> Endpoint:
        """A connection to the platform process that will speak as a VM (its first call is ``vm_attach``)."""
        return self._connect(self.data_dir / "platform.sock", "evil-vm->platform")

    def attach(self, endpoint: Endpoint, name: str, memory: int) -> GuestMemory:
        """``vm_attach`` a memfd the attacker made (and can read) as the hardware of VM ``name``."""
        fake = GuestMemory(memory, name=f"evil-{name}")
        self._memories.append(fake)
        endpoint.call("vm_attach", {"name": name, "memory": memory, "mode": "incoming"}, fds=[fake.fd])
        return fake

    def impersonate_vm(self, name: str, memory: int) -> tuple[Endpoint, GuestMemory]:
        endpoint = self.platform_as_vm()
        return endpoint, self.attach(endpoint, name, memory)

    def close(self) -> None:
        for endpoint in self._endpoints:
            endpoint.close()
        for memory in self._memories:
            memory.close()
        self._endpoints.clear()
        self._memories.clear()

    def __enter__(self) -> HostCommands:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
