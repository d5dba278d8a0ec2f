"""A small fleet simulation end to end: the real controller process and database, simulated hosts on
loopback, VMs created through the API, a wave over every host with a host failing — and the ground truth's
checks shown to catch a violation, a second copy and a lost VM injected behind the controller's back."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from cvmotion.sim.hosts import SimFleet
from cvmotion.sim.ledger import Verdict
from cvmotion.sim.plot import write_plot
from cvmotion.sim.report import render_table, summarise
from cvmotion.sim.run import SimConfig, simulate
from cvmotion.sim.scenario import Scenario

_WAIT_S = 20.0


def _located(fleet: SimFleet, scenario: Scenario) -> list[tuple[str, str, bool]]:
    """(host-side name, host, opted in) of every VM a host runs."""
    with fleet.lock:
        return [
            (name, host.name, scenario.by_host_name[name].opted_in)
            for host in fleet.hosts.values()
            for name in host.vms
            if name in scenario.by_host_name
        ]


def _inject(fleet: SimFleet, scenario: Scenario, clean: dict[str, Verdict]) -> None:
    clean["verdict"] = fleet.ledger.verdict()
    located = _located(fleet, scenario)
    out = next((name, host) for name, host, opted in located if not opted)
    others = [(name, host) for name, host, _ in located if name != out[0]]
    elsewhere = next(h for h in fleet.hosts if h != out[1])
    with httpx.Client(base_url=fleet.api_prefix, timeout=10) as http:
        # A live migration of a VM that never opted in, asked of its host directly (no controller).
        mig = http.post(f"/h/{out[1]}/v1/vms/{out[0]}/migrate", json={"destination": fleet.url_of(elsewhere)})
        assert mig.status_code == 202, mig.text
        deadline = time.monotonic() + _WAIT_S
        path = f"/h/{out[1]}/v1/migrations/{mig.json()['migration']}"
        while http.get(path).json()["status"] != "completed":
            assert time.monotonic() < deadline, "the injected migration did not complete"
            time.sleep(0.05)
        # A second copy of another VM on another host, and a third VM deleted from its host.
        twin, twin_host = others[0]
        other_host = next(h for h in fleet.hosts if h != twin_host)
        assert http.post(f"/h/{other_host}/v1/vms", json={"name": twin, "size": "Standard_DC2as_v5"}).status_code == 201
        gone, gone_host = others[1]
        assert http.delete(f"/h/{gone_host}/v1/vms/{gone}").status_code == 200


def test_a_wave_through_the_migrate_api_keeps_every_invariant_and_the_checks_catch_injected_breaks(
    tmp_path: Path,
) -> None:
    clean: dict[str, Verdict] = {}
    t0 = time.monotonic()
    outcome = simulate(
        SimConfig(hosts=20, vms=100, seed=3, speed=60.0, failures=1, driver="migrate"),
        inject=lambda f, s: _inject(f, s, clean),
    )
    took = time.monotonic() - t0

    before = clean["verdict"]
    assert (before.policy_violations, before.two_copies, before.lost) == (0, 0, [])
    summary: dict[str, Any] = summarise(outcome)
    assert summary["setup"]["vms_created"] == 100
    assert summary["wave"]["hosts"] == 20
    assert summary["wave"]["host_failures_injected"] == 1
    assert summary["moves"]["live"] > 0
    assert summary["moves"]["in_place"] > 0
    assert summary["moves"]["live_refused_by_controller"] > 0  # the opted-out and denied VMs
    assert 0 < summary["blackout_ms"]["p50"] <= summary["blackout_ms"]["p99"]
    assert summary["controller"]["vm_steps"] > 0
    assert summary["controller"]["db_statements_per_s"] > 0

    after = outcome.verdict
    assert after.policy_violations >= 1, "an opted-out VM live-migrated must be a violation"
    assert any("without the owner's opt-in" in v.detail for v in after.violations)
    assert after.two_copies == 1
    assert len(after.lost) == 1

    plot = tmp_path / "sim.png"
    write_plot(outcome, summary, plot)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert render_table(summary).row_count > 10
    assert took < 90, f"the small simulation took {took:.0f} s"


def test_a_wave_through_the_controllers_drain_api_walks_the_ladder_and_keeps_every_invariant() -> None:
    outcome = simulate(SimConfig(hosts=6, vms=24, seed=5, speed=60.0, failures=0, notice_virtual_s=60.0))
    summary = summarise(outcome)
    assert summary["config"]["wave_driver"] == "drain-api"
    assert [d["reason"] for d in summary["wave"]["domains"]] == ["SecurityUpdate", "HardwareRefresh"]
    inv = summary["invariants"]
    assert (inv["policy_violations"], inv["vms_on_two_hosts"], inv["vms_lost"]) == (0, 0, 0), inv["examples"]
    assert summary["moves"]["live"] > 0
    assert summary["moves"]["in_place"] > 0
    steps = [s for h in outcome.wave.hosts for s in h.steps]
    assert {s.method for s in steps} >= {"LiveMigration", "MemoryPreservingUpdate"}
    assert all(s.outcome in ("Succeeded", "Blocked") for s in steps), [s for s in steps if s.outcome == "Failed"]


def test_a_database_that_is_down_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    from cvmotion.cli.main import main

    assert main(["simulate", "--hosts", "4", "--vms", "4", "--db", "postgresql://nobody@127.0.0.1:1/x", "--json"]) == 1
    err = capsys.readouterr().err
    assert "the controller did not start: the database is unreachable" in err
    assert "Traceback" not in err
