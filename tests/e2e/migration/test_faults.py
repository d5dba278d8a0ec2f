"""Crashes and cuts at every phase of a live migration, through real processes: the source daemon, the
destination daemon (SIGKILL) or the connection dies while the adversary holds the traffic at the phase's frame;
a killed daemon restarts on the same data directory (its VM and platform processes lived on).

Phases: set-up (the MAs' TLS frames), each pre-copy round (epoch tokens 0 and 1), the pause (the first bundle of the
final epoch), state transfer (vCPU state), the start token, after the commit (the destination's "committed").
Each case ends with the kvstore VM running on exactly one host with every write the host API acknowledged
during the migration still readable, and with no guest key in anything the untrusted side handled.  Where the
start token had not reached the destination the VM ends on the source; after the commit, on the destination.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from mig_world import Victim, World

from cvmotion.abi.wire import BundleType
from cvmotion.agent.wire import FrameType
from cvmotion.testing.adversary import Direction, Frame
from cvmotion.testing.invariants import KvLedger
from cvmotion.testing.tampering import On, bundle, control, freeze, ma

pytestmark = pytest.mark.timeout(240)

A, B = "host-a", "host-b"
# Epochs 0 and 1, the pause in 2: the limit is never met, so the switchover is forced (opt-in).
ROUNDS = {"downtime_limit_ms": 0.01, "max_rounds": 2, "auto_converge": False, "force_switchover": True}


def _final_epoch(f: Frame) -> bool:
    h = f.bundle()
    return h is not None and h.epoch == ROUNDS["max_rounds"] and f.direction is Direction.FORWARD


PHASES: dict[str, tuple[Callable[[Frame], bool], dict[str, Any]]] = {
    "setup": (ma(Direction.FORWARD, FrameType.TLS), {}),
    "round": (bundle(BundleType.EPOCH_TOKEN, epoch=0), ROUNDS),
    "round-1": (bundle(BundleType.EPOCH_TOKEN, epoch=1), ROUNDS),
    "pause": (_final_epoch, ROUNDS),
    "state": (bundle(BundleType.VCPU_STATE), {}),
    "start": (bundle(BundleType.START_TOKEN), {}),
    "commit": (control("committed"), {}),
}
# Where the VM must end (None: either, by timing — a source killed at "state" may not have sealed its start
# token yet; one killed at "start" closes its control connection, and the destination aborts if it sees that
# before the released start token; the invariants hold either way).
EXPECTED = {
    "cut": {"setup": A, "round": A, "round-1": A, "pause": A, "state": A, "start": A, "commit": B},
    "kill-source": {"setup": A, "round": A, "round-1": A, "pause": A, "state": None, "start": None, "commit": B},
    "kill-destination": {"setup": A, "round": A, "round-1": A, "pause": A, "state": A, "start": A, "commit": B},
}
DEFAULT = {("setup", "cut"), ("round", "kill-source"), ("pause", "kill-destination"), ("state", "kill-source"),
           ("start", "kill-destination"), ("commit", "kill-source")}  # fmt: skip
MATRIX = [
    pytest.param(phase, fault, marks=() if (phase, fault) in DEFAULT else pytest.mark.slow, id=f"{fault}@{phase}")
    for fault in EXPECTED
    for phase in PHASES
]


@pytest.fixture
def kv_victim(fault_world: World, request: pytest.FixtureRequest) -> Iterator[Victim]:
    victim = fault_world.new_kv_vm("k" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:8])
    try:
        yield victim
    finally:
        fault_world.drop_vm(victim)


def _run_fault(world: World, victim: Victim, phase: str, fault: str) -> tuple[KvLedger, str]:
    predicate, options = PHASES[phase]
    ledger = KvLedger(world.hosts, victim.name, seed=len(phase) * 7 + len(fault))
    for _ in range(20):
        ledger.put()  # acknowledged before the migration
    ledger.start()
    mig = world.start_migration(victim, On(predicate, freeze), **options)
    assert world.proxy.frozen.wait(60), f"the migration never reached phase {phase}"
    if fault == "cut":
        world.proxy.cut()
    elif fault == "kill-source":
        world.a.kill()
        world.a.start()
    else:
        world.b.kill()
        world.b.start()
    world.proxy.thaw()  # what the proxy still held goes on (or finds its connection gone)
    return ledger, mig


@pytest.mark.parametrize(("phase", "fault"), MATRIX)
def test_fault(fault_world: World, kv_victim: Victim, phase: str, fault: str) -> None:
    world = fault_world
    ledger, _mig = _run_fault(world, kv_victim, phase, fault)
    try:
        placement = world.finish(kv_victim, expect_host=EXPECTED[fault][phase], timeout=90)
    finally:
        ledger.stop()
    host = next(h for h in world.hosts if h.name == placement.host)
    assert ledger.verify(host) >= 20
    assert world.a.running()
    assert world.b.running()


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["round", "start"])
def test_silent_partition(fault_world: World, kv_victim: Victim, phase: str) -> None:
    """Traffic stops for good (nothing is closed): both sides give up within their I/O and commit timeouts and
    reach a verdict — before the start token the source aborts on its own; after it, the destination's abort
    token (fetched over the host API) lets the source resume."""
    world = fault_world
    predicate, options = PHASES[phase]
    ledger = KvLedger(world.hosts, kv_victim.name, seed=3)
    for _ in range(20):
        ledger.put()
    mig = world.start_migration(kv_victim, On(predicate, freeze), io_timeout_s=3.0, commit_timeout_s=6.0, **options)
    assert world.proxy.frozen.wait(60)
    info = world.wait_migration(mig, timeout=60)
    assert info["status"] == "failed", info
    world.finish(kv_victim, expect_host=A, timeout=60)
    assert ledger.verify(world.a) >= 20
    world.proxy.cut()
