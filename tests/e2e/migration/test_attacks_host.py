"""The hypervisor attacks through its own command interfaces: the platform socket (SNP and migration commands),
the VM processes' control sockets, a compromised source engine (``EvilSource``: the shipped ``Sender`` with
calls rewritten) and a destination daemon that impersonates a VM's hardware.

The firmware and the VM processes are hardware: whatever the daemon sends, a frozen source never runs
without the destination's abort token, the destination never hands out an abort token after it committed,
the firmware never exports a guest's identity with another VM's memory, never issues a start token while a
written page was withheld, and never decrypts a guest into memory the host supplied.
"""

from __future__ import annotations

import base64
import random
from typing import Any

import pytest
from mig_world import MEMORY, Victim, World

from cvmotion.abi.wire import BundleType
from cvmotion.agent.wire import FrameType
from cvmotion.errors import CvmError, FirmwareError, IntegrityError, UsageError
from cvmotion.migration.options import MigrationOptions
from cvmotion.migration.stats import MigrationStatus
from cvmotion.testing.adversary import Direction
from cvmotion.testing.evil import EvilSource, hide_dirty_pages, ignore_the_held_harvest, swap_export_hardware
from cvmotion.testing.hostcmd import HostCommands, forge_abort_token
from cvmotion.testing.tampering import On, bundle, control, flip, freeze, ma

pytestmark = pytest.mark.timeout(180)

A, B = "host-a", "host-b"
START = BundleType.START_TOKEN
REFUSED = "is not a command this client may send"


def test_frozen_source_cannot_be_resumed_without_a_token(attack_world: World, victim: Victim) -> None:
    """After the start token (held by the proxy, so the destination has not committed yet) the source daemon
    tries every way to run the VM again: resume, start, a local abort, a forged token, a genuine token of an
    earlier session, and re-binding the VM process to another guest's handle."""
    world = attack_world
    world.migrate(victim, On(bundle(START), flip("mac", random.Random(6))))  # an aborted session: a real token
    old_token = base64.b64decode(world.proxy.log(control("aborted"))[0].control()["token"])  # type: ignore[index]
    mig = world.start_migration(victim, On(bundle(START), freeze))
    assert world.proxy.frozen.wait(60), "the migration never reached its start token"
    handle = int(world.a.vms()[victim.name]["handle"])
    with HostCommands(world.a.data_dir) as evil:
        assert evil.platform_call("export_status", {"handle": handle})[0]["state"] == "POST_EXPORT"
        for method in ("resume", "start"):
            with pytest.raises(UsageError, match="does not let this guest run"):
                evil.vm_call(victim.name, method)
        with pytest.raises(FirmwareError):
            evil.platform_call("export_abort", {"handle": handle})
        for token in (forge_abort_token(bytes(16)), old_token):
            with pytest.raises(IntegrityError):
                evil.platform_call("export_abort_with_token", {"handle": handle}, token)
        # Borrow the permission of another guest on this chip (the MA's own context, other VMs): a VM process
        # asks the secure processor about the guest its hardware runs, not about a handle the daemon names.
        for other in range(1, handle + 3):
            if other == handle:
                continue
            evil.vm_call(victim.name, "bind", {"handle": other})
            with pytest.raises(CvmError):
                evil.vm_call(victim.name, "resume")
        evil.vm_call(victim.name, "bind", {"handle": handle})
    world.proxy.thaw()
    info = world.wait_migration(mig)
    assert info["status"] == "completed", info
    world.finish(victim, expect_host=B)


@pytest.mark.slow
def test_destination_cannot_abort_after_commit(attack_world: World, victim: Victim) -> None:
    """A malicious destination daemon wants an abort token (to run the VM twice): refused once committed."""
    world = attack_world
    info = world.migrate(victim)
    assert info["status"] == "completed", info
    with HostCommands(world.b.data_dir) as evil:
        for method in ("import_abort", "import_discard"):
            with pytest.raises(FirmwareError):
                evil.platform_call(method, {"vm": victim.name})
        with pytest.raises(FirmwareError):
            evil.platform_call("import_activate", {"vm": victim.name})
    world.finish(victim, expect_host=B)


def test_command_whitelists(attack_world: World, victim: Victim) -> None:
    """Key-moving firmware calls are the MA's alone; VM-only and host-only methods stay with their role."""
    world = attack_world
    with HostCommands(world.a.data_dir) as evil:
        for method in (
            "ma_export_prepare",
            "ma_export_install_backward_key",
            "ma_import_install_forward_key",
            "ma_import_generate_backward_key",
            "vm_attach",
            "vm_detach",
            "sp_capture_state",
        ):
            with pytest.raises(UsageError, match=REFUSED):
                evil.platform_call(method, {"handle": 1, "vm": victim.name, "session_id": "00" * 16})
        # A daemon that says vm_attach is not a VM process: refused, and the connection keeps the VM role.
        vm_role = evil.platform_as_vm()
        with pytest.raises(UsageError, match="is not the VM process"):
            evil.attach(vm_role, "evil-probe", MEMORY)
        for method in ("export_start", "export_memory", "guest_request", "ma_deliver", "launch", "status"):
            with pytest.raises(UsageError, match=REFUSED):
                vm_role.call(method, {"handle": 1})
    world.finish(victim, expect_host=A)


def test_export_with_another_vms_hardware(attack_world: World, victim: Victim) -> None:
    """The compromised engine starts the victim's export naming another VM's hardware: the destination would
    run the victim's identity (VMPCKs, measurement) over memory of the attacker's choosing."""
    world = attack_world
    decoy = world.new_vm(victim.name[:-1] + "x", seed=victim.seed ^ 0x55)
    try:
        swap = swap_export_hardware(decoy.name)
        evil = EvilSource(world.a, victim.name, world.b, options=_options(), platform_call=swap, hardware_vm=decoy.name)
        stats = evil.run()
        assert stats.status is MigrationStatus.FAILED, stats.query_migrate()
        assert stats.outcome == "resumed on source"
        assert f"does not run guest {victim_handle(world, victim)}" in str(stats.error), stats.error
        world.finish(victim, expect_host=A)
        assert decoy.watch is not None
        decoy.watch.check(world.a, decoy.name)
    finally:
        world.drop_vm(decoy)


def test_withheld_dirty_pages(attack_world: World, victim: Victim) -> None:
    """The compromised engine never resends written pages (its dirty log "comes back empty") and drops the pages
    the firmware names when it holds the VM: the firmware, fed by the hardware's own log, refuses the start
    token; the VM resumes on the source."""
    world = attack_world
    world.proxy.reset()
    stats = EvilSource(
        world.a,
        victim.name,
        world.b,
        options=_options(),
        vm_answer=hide_dirty_pages,
        platform_answer=ignore_the_held_harvest,
        firmware_switchover=False,
    ).run()
    assert stats.status is MigrationStatus.FAILED, stats.query_migrate()
    assert stats.outcome == "resumed on source"
    assert "start token refused" in (stats.error or ""), stats.error
    assert stats.rounds, "the engine never got to send a round"
    world.finish(victim, expect_host=A)


@pytest.mark.parametrize("switchover", ["export_pause", "export_switchover"])
def test_withheld_dirty_pages_are_named_at_the_hold(attack_world: World, victim: Victim, switchover: str) -> None:
    """The same engine, but it sends what ``export_pause`` names (the firmware's harvest once the VM is held, with
    every page the hardware's log handed the firmware since its last look), or it leaves the stop-and-copy to the
    firmware (``export_switchover`` seals what its own clean map says is left): the VM moves, its memory intact."""
    world = attack_world
    world.proxy.reset()
    stats = EvilSource(
        world.a,
        victim.name,
        world.b,
        options=_options(),
        vm_answer=hide_dirty_pages,
        firmware_switchover=switchover == "export_switchover",
    ).run()
    assert stats.status is MigrationStatus.COMPLETED, stats.query_migrate()
    world.a.api("DELETE", f"/v1/vms/{victim.name}")  # the source daemon's stale record of the VM
    world.finish(victim, expect_host=B)  # the watch checks the guest's memory against its model


def test_destination_impersonates_the_incoming_vms_hardware(attack_world: World, victim: Victim) -> None:
    """The destination daemon attaches memory it can read as the incoming VM's RAM before the import starts:
    the secure processor must not decrypt the guest into it."""
    world = attack_world
    mig = world.start_migration(victim, On(ma(Direction.FORWARD, FrameType.HELLO), freeze))
    assert world.proxy.frozen.wait(60)
    with HostCommands(world.b.data_dir) as evil, pytest.raises(UsageError, match="is not the VM process"):
        evil.impersonate_vm(victim.name, MEMORY)
    world.proxy.thaw()
    info = world.wait_migration(mig)
    assert info["status"] == "completed", info
    world.finish(victim, expect_host=B)


def victim_handle(world: World, victim: Victim) -> int:
    return int(world.a.vms()[victim.name]["handle"])


def _options(**changes: Any) -> MigrationOptions:
    base: dict[str, Any] = {"io_timeout": 8.0, "setup_timeout": 8.0, "commit_timeout": 15.0}
    return MigrationOptions(**{**base, **changes})
