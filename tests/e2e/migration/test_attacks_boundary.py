"""Attacks on the secure processor's boundary: a hostile daemon re-launching used hardware (a fork and a page
oracle), and a network that forges the destination's "committed" (which would leave the VM running nowhere).

Each ends with the invariants of ``World.finish``: the VM executes on exactly one host, its memory is the
latest (memdirty's checksum model), and every kvstore write the host API acknowledged is still there.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from mig_world import Victim, World

from cvmotion.abi.wire import BundleType
from cvmotion.errors import FirmwareError, UsageError
from cvmotion.migration.options import MigrationOptions
from cvmotion.migration.stats import MigrationStatus
from cvmotion.testing.evil import EvilSource
from cvmotion.testing.hostcmd import HostCommands
from cvmotion.testing.tampering import Chain, Frame, On, bundle, control, drop, rewrite

pytestmark = pytest.mark.timeout(180)

A, B = "host-a", "host-b"
USED = "served a guest already"


def _launch_args(world: World, victim: Victim, ranges: list[list[int]]) -> dict[str, Any]:
    info = world.a.vms()[victim.name]
    return {"vm": victim.name, "policy": int(info["policy"]), "ranges": ranges, "host_data": "00" * 32}


def test_launch_over_a_running_guests_hardware_is_refused(attack_world: World, victim: Victim) -> None:
    """Finding 1 and 2: LAUNCH over the hardware of a running guest would be a second context over its memory
    (resume it: a fork) and a SHA-384 chain over its pages (a plaintext oracle); the secrets page at a GPA the
    host picks would overwrite one of its pages."""
    world = attack_world
    data_pages = [[0x400000, 0x1000], [0x100000, 0x10000]]
    with HostCommands(world.a.data_dir) as evil:
        for ranges in (data_pages, [[0x9000, 0x2000]]):
            with pytest.raises(FirmwareError, match=USED):
                evil.platform_call("launch", _launch_args(world, victim, ranges))
        # Malformed ranges are refused before anything is claimed or measured.
        for ranges in ([[0x7000, 0x1000]], [[0x6000, 0x3000]], [[0x1001, 0x1000]], [[0, 1 << 40]], []):
            with pytest.raises(FirmwareError, match="secrets page|not guest RAM|ranges"):
                evil.platform_call("launch", _launch_args(world, victim, ranges))
        # Host commands name only VM guests: the MA's own context (or any other) is not the host's to touch.
        vm_handles = {int(v["handle"]) for v in world.a.vms().values() if v.get("handle") is not None}
        for other in (h for h in range(1, max(vm_handles) + 3) if h not in vm_handles):
            for method in ("decommission", "guest_request", "export_start"):
                with pytest.raises((FirmwareError, UsageError)):
                    evil.platform_call(method, {"handle": other, "vm": victim.name})
    world.finish(victim, expect_host=A)


def test_no_fork_when_the_source_skips_its_final_stop(attack_world: World, victim: Victim) -> None:
    """Finding 1 end to end: the compromised source engine never stops the VM after the destination committed,
    then re-launches a guest over the old VM's hardware and resumes it. Both are refused: only host-b runs."""
    world = attack_world
    world.proxy.reset()

    def no_stop(method: str, args: dict[str, Any], blob: bytes) -> tuple[str, dict[str, Any], bytes]:
        return ("info" if method == "stop" else method), args, blob

    stats = EvilSource(world.a, victim.name, world.b, options=_options(), vm_call=no_stop).run()
    assert stats.status is MigrationStatus.COMPLETED, stats.query_migrate()
    with HostCommands(world.a.data_dir) as evil:
        with pytest.raises(FirmwareError, match=USED):
            evil.platform_call("launch", _launch_args(world, victim, [[0x100000, 0x1000]]))
        for method in ("resume", "start"):
            with pytest.raises(UsageError, match="does not let this guest run"):
                evil.vm_call(victim.name, method)
    world.a.api("DELETE", f"/v1/vms/{victim.name}")  # the source daemon's stale record of the VM
    world.finish(victim, expect_host=B)


def test_forged_committed_does_not_decommission_the_source(attack_world: World, victim: Victim) -> None:
    """Finding 3: the network withholds the start token (the destination cannot commit, times out and aborts)
    and rewrites the destination's "aborted" into "committed". The source's firmware wants the destination's
    commit receipt, refuses the forgery and keeps the VM frozen; the recovery poller fetches the real abort
    token from the destination and the VM runs on the source again. It is never left running nowhere."""
    world = attack_world

    def forged(f: Frame) -> Frame:
        message = {"type": "committed", "handle": 1, "phases": {}, "receipt": "Y29tbWl0dGVk"}
        return f.replace(payload=json.dumps(message).encode())

    attack = Chain(On(bundle(BundleType.START_TOKEN), drop), On(control("aborted"), rewrite(forged)))
    info = world.migrate(victim, attack, io_timeout_s=3.0)
    world.finish(victim, expect_host=A)
    assert victim.name not in world.b.vms()
    info = world.a.api("GET", f"/v1/migrations/{info['x-cvmotion']['id']}")
    assert info["status"] == "failed", info
    assert info["x-cvmotion"]["outcome"] == "resumed on source", info
    events = [e["type"] for e in world.a.api("GET", "/v1/events?limit=500")["events"]]
    assert "cvmotion.MigrationRecovered" in events


def _options(**changes: Any) -> MigrationOptions:
    base: dict[str, Any] = {"io_timeout": 8.0, "setup_timeout": 8.0, "commit_timeout": 15.0}
    return MigrationOptions(**{**base, **changes})
