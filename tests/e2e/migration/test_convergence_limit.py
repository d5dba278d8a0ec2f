"""The downtime limit is a limit: a pre-copy that does not converge within ``max_rounds`` fails before the start
token and the VM runs on at the source (no pause past the limit), unless the caller opted into forcing the
switchover. Real processes, a memdirty guest writing its working set, a limit it can never meet."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
from mig_world import Victim, World

pytestmark = pytest.mark.timeout(180)

A, B = "host-a", "host-b"
NEVER = {"downtime_limit_ms": 0.01, "max_rounds": 2, "auto_converge": False}  # no dirty set fits 10 µs


@pytest.fixture
def busy_victim(attack_world: World, request: pytest.FixtureRequest) -> Iterator[Victim]:
    # A name of its own per test: the previous test's VM may still be going away on either host.
    victim = attack_world.new_vm("nc" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:8], seed=0xC0)
    try:
        yield victim
    finally:
        attack_world.drop_vm(victim)


def test_a_migration_that_cannot_meet_its_limit_fails_and_the_vm_runs_on(
    attack_world: World, busy_victim: Victim
) -> None:
    world = attack_world
    world.proxy.reset()
    info = world.migrate(busy_victim, **NEVER)
    assert info["status"] == "failed", info
    assert info["x-cvmotion"]["error-kind"] == "NotConverged", info
    assert "over the 0.01 ms limit" in info["error-desc"], info
    assert info["x-cvmotion"]["outcome"] == "resumed on source", info
    assert len(info["x-cvmotion"]["rounds"]) == NEVER["max_rounds"]
    assert "downtime" not in info  # never paused for the switchover
    world.finish(busy_victim, expect_host=A)


def test_forcing_the_switchover_is_the_callers_choice(attack_world: World, busy_victim: Victim) -> None:
    world = attack_world
    world.proxy.reset()
    info = world.migrate(busy_victim, **NEVER, force_switchover=True)
    assert info["status"] == "completed", info
    assert info["x-cvmotion"]["forced-switchover"] is True, info
    # The guest's blackout on this one host clock: the source's pause to the destination's resume, inside the
    # reported downtime (which also waits for the destination's "committed" to come back).
    listed = world.b.api("GET", "/v1/migrations")["migrations"]
    arrived = [m for m in listed if m["x-cvmotion"]["vm"] == busy_victim.name]
    blackout_ms = (arrived[-1]["x-cvmotion"]["resumed-at"] - info["x-cvmotion"]["paused-at"]) * 1000
    assert 0 < blackout_ms <= info["x-cvmotion"]["downtime-ms"] + 1, (blackout_ms, info)
    world.finish(busy_victim, expect_host=B)
