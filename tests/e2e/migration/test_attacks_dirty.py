"""A hostile daemon against the dirty log: it cannot erase a bit the secure processor relies on.

The compromised engine (``EvilSource``) has the cvm-io device write into guest memory after round 0 (a kvstore
PUT: the VMM copies the request into the guest's buffer, the guest stores it), then calls the VM process's
``start_dirty_tracking`` again before its next harvest.  That call used to clear the VMM's dirty bitmap, so the
device's write reached neither the engine nor the firmware and the destination committed a stale page.  Now it
only moves the engine's baseline: the harvest it makes reaches the SP first.  The SP names the page in its answer
to ``export_pause`` (the harvest once the VM is held): an engine that sends what it is told moves the VM with the
write; one that ignores it gets the start token refused, and the VM resumes on the source with the write intact.
The shipped engine leaves the stop-and-copy to the firmware (``export_switchover``), which seals the page itself.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from mig_world import World

from cvmotion.ipc.rpc import Endpoint
from cvmotion.migration.options import MigrationOptions
from cvmotion.migration.stats import MigrationStatus
from cvmotion.testing.evil import EvilSource, ignore_the_held_harvest
from cvmotion.testing.hostcmd import HostCommands
from cvmotion.vmm.workloads import KvClient

pytestmark = pytest.mark.timeout(180)

KEY, VALUE = b"written-by-the-device", b"after round 0" * 8


class _CvmIoOverControl:
    """The VM's cvm-io device as the daemon reaches it (the ``cvmio`` command of the VM's control socket)."""

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint

    def submit(self, request: bytes, timeout: float) -> bytes:
        _, reply, _ = self._endpoint.call("cvmio", {"timeout": timeout}, request, timeout=timeout + 5)
        return reply


# engine -> the victim VM's name
ENGINES = {
    "ignores the held harvest": "dirty-erase-ignored",
    "sends the held harvest": "dirty-erase-sent",
    "leaves the switchover to the firmware": "dirty-erase-fw",
}


@pytest.mark.parametrize("engine", list(ENGINES))
def test_restarting_dirty_tracking_cannot_erase_a_device_write(attack_world: World, engine: str) -> None:
    world = attack_world
    ignores = engine == "ignores the held harvest"
    firmware = engine == "leaves the switchover to the firmware"
    victim = world.new_kv_vm(ENGINES[engine])
    fired = threading.Event()
    try:
        with HostCommands(world.a.data_dir) as evil:
            control = evil.vm(victim.name)

            def erase_after_a_device_write(method: str, args: dict[str, Any], blob: bytes) -> Any:
                if method == "harvest_dirty" and not fired.is_set():
                    KvClient(_CvmIoOverControl(control)).put(KEY, VALUE)  # type: ignore[arg-type]
                    control.call("start_dirty_tracking")
                    fired.set()
                return method, args, blob

            world.proxy.reset()
            options = MigrationOptions(io_timeout=8.0, setup_timeout=8.0, commit_timeout=15.0)
            stats = EvilSource(
                world.a,
                victim.name,
                world.b,
                options=options,
                vm_call=erase_after_a_device_write,
                platform_answer=ignore_the_held_harvest if ignores else None,
                firmware_switchover=firmware,
            ).run()
            assert fired.is_set(), "the engine never harvested after round 0"
            if ignores:
                assert stats.status is MigrationStatus.FAILED, stats.query_migrate()
                assert stats.outcome == "resumed on source"
                assert "start token refused" in (stats.error or ""), stats.error
                world.finish(victim, expect_host="host-a")
                assert KvClient(_CvmIoOverControl(evil.vm(victim.name))).get(KEY) == VALUE  # type: ignore[arg-type]
            else:
                # The error first: pytest shortens a long query-migrate dict before it gets there.
                why = f"{stats.error_kind}: {stats.error} ({stats.outcome}); {stats.query_migrate()}"
                assert stats.status is MigrationStatus.COMPLETED, why
                world.a.api("DELETE", f"/v1/vms/{victim.name}")  # the source daemon's stale record of the VM
                world.finish(victim, expect_host="host-b")
                with HostCommands(world.b.data_dir) as on_b:
                    assert KvClient(_CvmIoOverControl(on_b.vm(victim.name))).get(KEY) == VALUE  # type: ignore[arg-type]
    finally:
        world.drop_vm(victim)
