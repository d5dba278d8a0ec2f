"""The ground truth's checks: each invariant is caught when broken, and silent when kept."""

from __future__ import annotations

from cvmotion.sim.ledger import Intent, Ledger, Method


def _ledger() -> Ledger:
    ledger = Ledger()
    ledger.host_pool("a", "pool-a")
    ledger.host_pool("b", "pool-b")
    return ledger


def test_a_clean_live_migration_keeps_every_invariant_and_measures_its_blackout() -> None:
    ledger = _ledger()
    ledger.intend("vm", Intent(opted_in=True))
    ledger.start(0.0, "vm", "a", Method.CREATE)
    ledger.pause(10.0, "vm", "a")
    ledger.stop(10.05, "vm", "a")
    ledger.start(10.05, "vm", "b", Method.LIVE)
    verdict = ledger.verdict()
    assert (verdict.policy_violations, verdict.two_copies, verdict.lost) == (0, 0, [])
    assert [round(b.ms) for b in ledger.blackouts] == [50]
    assert [m for _, m in ledger.moves] == [Method.LIVE]


def test_a_second_instance_is_two_copies() -> None:
    ledger = _ledger()
    ledger.intend("vm", Intent(opted_in=True))
    ledger.start(0.0, "vm", "a", Method.CREATE)
    ledger.start(1.0, "vm", "b", Method.LIVE)
    assert ledger.verdict().two_copies == 1


def test_a_paused_source_still_counts_as_an_instance() -> None:
    ledger = _ledger()
    ledger.intend("vm", Intent(opted_in=True))
    ledger.start(0.0, "vm", "a", Method.CREATE)
    ledger.pause(1.0, "vm", "a")
    ledger.start(1.1, "vm", "b", Method.LIVE)
    assert ledger.verdict().two_copies == 1


def test_policy_violations_are_judged_from_the_tenants_intent() -> None:
    ledger = _ledger()
    ledger.intend("pinned", Intent(opted_in=True, pools=frozenset({"pool-a"})))
    ledger.intend("out", Intent(opted_in=False))
    ledger.intend("denied", Intent(opted_in=True, live_denied=True))
    for name in ("pinned", "out", "denied"):
        ledger.start(0.0, name, "a", Method.CREATE)
        ledger.stop(1.0, name, "a")
        ledger.start(1.0, name, "b", Method.LIVE)
    verdict = ledger.verdict()
    assert verdict.policy_violations == 3
    assert sorted(v.vm for v in verdict.violations) == ["denied", "out", "pinned"]


def test_a_placement_outside_the_pools_is_a_violation_even_without_a_move() -> None:
    ledger = _ledger()
    ledger.intend("vm", Intent(opted_in=False, pools=frozenset({"pool-a"})))
    ledger.start(0.0, "vm", "b", Method.CREATE)
    assert ledger.verdict().policy_violations == 1


def test_a_vm_that_ran_and_is_nowhere_is_lost_one_never_started_is_not() -> None:
    ledger = _ledger()
    ledger.intend("gone", Intent(opted_in=True))
    ledger.intend("never", Intent(opted_in=True))
    ledger.start(0.0, "gone", "a", Method.CREATE)
    ledger.stop(5.0, "gone", "a")
    assert ledger.verdict().lost == ["gone"]


def test_an_in_place_pause_is_a_blackout_of_that_method() -> None:
    ledger = _ledger()
    ledger.intend("vm", Intent(opted_in=False))
    ledger.start(0.0, "vm", "a", Method.CREATE)
    ledger.pause(2.0, "vm", "a")
    ledger.resume(2.4, "vm", "a", Method.INPLACE)
    assert [(round(b.ms), b.method) for b in ledger.blackouts] == [(400, Method.INPLACE)]


def test_a_fresh_start_of_a_vm_that_ran_before_is_a_redeploy_with_its_gap() -> None:
    ledger = _ledger()
    ledger.intend("vm", Intent(opted_in=False))
    ledger.start(0.0, "vm", "a", Method.CREATE)
    ledger.stop(3.0, "vm", "a")
    ledger.start(5.5, "vm", "b", Method.CREATE)
    assert [(round(b.ms), b.method) for b in ledger.blackouts] == [(2500, Method.REDEPLOY)]
    assert ledger.verdict().two_copies == 0
