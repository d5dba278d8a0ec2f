"""testing: a malicious source host daemon — the shipped migration engine with some of its calls rewritten.

``EvilSource`` plays host-a's daemon for one VM: it asks the destination daemon for an incoming slot exactly
as the real daemon does (``POST /v1/migrations/incoming``), then runs ``migration.sender.Sender`` — the real
engine — against host-a's platform socket and the VM's control socket, through ``HookedEndpoint``s that let
a test rewrite any call (method, arguments, blob) or its answer.  That is what a compromised hypervisor is:
the same code paths, any input it likes.  The firmware and the VM process (hardware) must hold regardless.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from typing import Any, cast

import numpy as np

from cvmotion.ipc.rpc import Endpoint, connect_unix
from cvmotion.migration.options import MigrationOptions
from cvmotion.migration.sender import Destination, Sender, new_migration_id
from cvmotion.migration.stats import MigrationStats
from cvmotion.platformd.client import PlatformClient
from cvmotion.testing.hosts import HostProcess
from cvmotion.vmd.client import VmClient

__all__ = [
    "CallHook",
    "EvilSource",
    "HookedEndpoint",
    "hide_dirty_pages",
    "ignore_the_held_harvest",
    "swap_export_hardware",
]

# (method, args, blob) -> (method, args, blob); and the answer (result, blob, fds) -> answer.
CallHook = Callable[[str, dict[str, Any], bytes], tuple[str, dict[str, Any], bytes]]
AnswerHook = Callable[[str, Any], Any]


class HookedEndpoint:
    """An ``Endpoint`` whose outgoing calls (and their answers) pass through hooks first."""

    def __init__(self, inner: Endpoint, call: CallHook | None = None, answer: AnswerHook | None = None) -> None:
        self.inner = inner
        self._call = call
        self._answer = answer

    @property
    def closed(self) -> bool:
        return self.inner.closed

    def call(
        self, method: str, args: dict[str, Any] | None = None, blob: bytes | bytearray | memoryview = b"", **kw: Any
    ) -> Any:
        args, data = dict(args or {}), bytes(blob)
        if self._call is not None:
            method, args, data = self._call(method, args, data)
        out = self.inner.call(method, args, data, **kw)
        return out if self._answer is None else self._answer(method, out)

    def close(self) -> None:
        self.inner.close()


def swap_export_hardware(other_vm: str) -> CallHook:
    """``export_start`` of the victim's guest handle naming another VM's hardware (memory, vCPUs)."""

    def hook(method: str, args: dict[str, Any], blob: bytes) -> tuple[str, dict[str, Any], bytes]:
        if method == "export_start":
            args = {**args, "vm": other_vm}
        return method, args, blob

    return hook


def ignore_the_held_harvest(method: str, out: Any) -> Any:
    """An engine that drops the pages ``export_pause`` names (the SP's harvest once the VM is held): it sends only
    what its own harvests told it."""
    if method == "export_pause":
        result, _blob, fds = out
        return result, b"", fds
    return out


def hide_dirty_pages(method: str, out: Any) -> Any:
    """The engine's dirty log comes back empty: a hypervisor that "forgets" to resend written pages."""
    if method == "harvest_dirty":
        result, _blob, fds = out
        return {**result, "count": 0}, np.zeros(0, dtype="<u8").tobytes(), fds
    return out


class EvilSource:
    """host-a's daemon, compromised, migrating ``vm`` to ``destination`` with the shipped engine.

    ``hardware_vm``: the VM process the engine drives (run control, dirty log), by default ``vm``'s own;
    naming another one exports ``vm``'s guest context with that VM's vCPUs and memory.
    """

    def __init__(
        self,
        source: HostProcess,
        vm: str,
        destination: HostProcess,
        *,
        options: MigrationOptions,
        platform_call: CallHook | None = None,
        platform_answer: AnswerHook | None = None,
        vm_call: CallHook | None = None,
        vm_answer: AnswerHook | None = None,
        hardware_vm: str | None = None,
        firmware_switchover: bool = True,
    ) -> None:
        self.source = source
        self.vm = vm
        self.hardware_vm = hardware_vm or vm
        # False: the engine drives the stop-and-copy command by command (export_pause, its own final round,
        # export_final), the path on which an engine may ignore what the firmware names at the hold.
        self.firmware_switchover = firmware_switchover
        self.destination = destination
        self.options = options
        self.platform_call = platform_call
        self.platform_answer = platform_answer
        self.vm_call = vm_call
        self.vm_answer = vm_answer
        self._endpoints: list[Endpoint] = []

    def run(self) -> MigrationStats:
        info = self.source.api("GET", f"/v1/vms/{self.vm}")
        vm_dir = self.source.vm_dir(self.vm)
        meta = json.loads((vm_dir / "meta.json").read_text())
        session_id = os.urandom(16)
        mig_id = new_migration_id()
        body = {
            "vm": self.vm,
            "spec": json.loads((vm_dir / "vm.json").read_text()),
            "session_id": session_id.hex(),
            "options": self.options.to_json(),
            "source": self.source.name,
            "source_migration": mig_id,
            "policy": info["policy"],
            "migration_policy": meta["migration_policy"],
            "measurement": info["measurement"],
        }
        incoming = self.destination.api("POST", "/v1/migrations/incoming", body, signed_by=self.source)
        platform_ep = connect_unix(str(self.source.data_dir / "platform.sock"), name="evil-daemon->platform")
        platform_ep.call("host_hello")
        control = self.source.vm_dir(self.hardware_vm) / "control.sock"
        vm_ep = connect_unix(str(control), name=f"evil-daemon->vm-{self.hardware_vm}")
        self._endpoints += [platform_ep, vm_ep]
        hooked = HookedEndpoint(platform_ep, call=self.platform_call, answer=self.platform_answer)
        platform = PlatformClient(cast(Endpoint, hooked))
        vm = VmClient(self.vm, cast(Endpoint, HookedEndpoint(vm_ep, call=self.vm_call, answer=self.vm_answer)))
        stats = MigrationStats(id=mig_id, vm=self.vm, source=self.source.name, destination=self.destination.name)
        sender = Sender(
            stats=stats,
            platform=platform,
            vm=vm,
            handle=int(info["handle"]),
            policy_doc=base64.b64decode(meta["migration_policy"]),
            destination=Destination(
                host=str(incoming["host"]),
                port=int(incoming["port"]),
                ticket=str(incoming["ticket"]),
                migration_id=str(incoming["migration"]),
                name=str(incoming.get("name", "")),
            ),
            options=self.options,
            events=lambda kind, data: None,
            session_id=session_id,
            firmware_switchover=self.firmware_switchover,
        )
        try:
            return sender.run()
        finally:
            self.close()

    def close(self) -> None:
        for endpoint in self._endpoints:
            endpoint.close()
        self._endpoints.clear()
