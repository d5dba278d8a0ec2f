"""sim layer: one simulation from start to end — controller, world, fleet, wave, verdict.

Order: the scenario (seeded) → the controller process (real database, real API) → the simulated hosts'
server → every host registered through the API, heartbeats from then on → policies and VMs through the
API → (counters sampled) the wave → (counters sampled) the fleet left to settle → the ground truth's
verdict.  ``inject`` runs between the wave and the verdict (tests use it to break an invariant on purpose).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cvmotion.sim.clock import VirtualClock
from cvmotion.sim.controller import ControllerCounters, SimController
from cvmotion.sim.hosts import SimFleet
from cvmotion.sim.ledger import Verdict
from cvmotion.sim.populate import ControllerApi, Populated, populate
from cvmotion.sim.scenario import Scenario, build_scenario
from cvmotion.sim.wave import run_wave
from cvmotion.sim.waveplan import WaveOptions, WaveResult
from cvmotion.sim.world import World

__all__ = ["SimConfig", "SimOutcome", "simulate"]

_QUIET_TIMEOUT_S = 120.0
_AVAILABLE_TIMEOUT_S = 300.0  # heartbeats held back while the controller was busy creating VMs catch up


@dataclass(frozen=True, slots=True)
class SimConfig:
    hosts: int
    vms: int
    seed: int = 1
    db: str | None = None
    speed: float = 60.0
    per_host: int = 2
    workers: int = 8  # the controller's operation workers (controller serve's default)
    failures: int = -1  # -1: one host in a hundred (at least one)
    shared_tls: bool = True
    data_dir: Path | None = None
    driver: str = "auto"  # auto: the controller's drain API when it serves one; migrate: the per-VM migrate API
    notice_virtual_s: float = 300.0  # each Scheduled Event's NotBefore, in the hosts' (virtual) time


@dataclass(frozen=True, slots=True)
class SimOutcome:
    config: SimConfig
    scenario: Scenario
    fleet: SimFleet
    populated: Populated
    wave: WaveResult
    verdict: Verdict
    counters_before: ControllerCounters
    counters_after: ControllerCounters
    dialect: str
    heartbeats: int
    event_errors: list[str]


def _heartbeat_s(hosts: int) -> float:
    # The controller writes each heartbeat under its write lock: keep them near 10/s however large the fleet.
    return max(2.0, hosts / 10.0)


Progress = Callable[[str], None]
Inject = Callable[[SimFleet, Scenario], None]


def simulate(config: SimConfig, inject: Inject | None = None, progress: Progress | None = None) -> SimOutcome:
    with tempfile.TemporaryDirectory(prefix="cvmotion-sim-") as tmp:
        return _simulate(config, Path(config.data_dir or tmp), inject, progress or (lambda _text: None))


def _simulate(config: SimConfig, root: Path, inject: Inject | None, say: Progress) -> SimOutcome:
    scenario = build_scenario(config.hosts, config.vms, config.seed)
    clock = VirtualClock(config.speed)
    fleet = SimFleet(clock, config.seed, scenario.workload, epoch=time.time())
    for host in scenario.hosts:
        fleet.add(host)
    beat = _heartbeat_s(config.hosts)
    ctl = SimController(
        root / "controller", config.db, 3 * beat, sweep_period=max(1.0, beat / 4), shared_tls=config.shared_tls,
        workers=config.workers,
    )  # fmt: skip
    say(f"starting the controller ({'PostgreSQL' if config.db and 'postgres' in config.db else 'SQLite'})")
    ctl.start()
    api = ControllerApi(ctl.url, ctl.owner_token)
    try:
        with World(fleet, ctl.url, ctl.host_token, beat) as world:
            say(f"registering {config.hosts} hosts through the controller API")
            world.register_all()
            world.start_heartbeats()
            say(f"creating {config.vms} VMs through the controller API (deployments of up to 50)")
            populated = populate(api, scenario, fleet.ledger)
            behind = _wait_available(api, fleet, _AVAILABLE_TIMEOUT_S)
            say(f"{populated.created} VMs running after {populated.seconds:.0f} s; {behind} hosts not Available")
            failures = config.failures if config.failures >= 0 else max(1, config.hosts // 100)
            options = WaveOptions(
                per_host=config.per_host,
                failures=failures,
                seed=config.seed,
                driver=config.driver,
                notice_s=config.notice_virtual_s / config.speed,
            )
            before = ctl.counters()
            wave = run_wave(api, fleet, scenario, options)
            after = ctl.counters()
            say(f"wave done in {wave.ended:.0f} s; waiting for the fleet to settle")
            _wait_quiet(fleet)
            if inject is not None:
                inject(fleet, scenario)
            verdict = fleet.ledger.verdict()
            beats = world.heartbeats
        return SimOutcome(
            config, scenario, fleet, populated, wave, verdict, before, after, ctl.dialect, beats,
            list(fleet.scheduler.errors),
        )  # fmt: skip
    finally:
        api.close()
        ctl.stop()


def _wait_quiet(fleet: SimFleet) -> None:
    """Until nothing is in flight and no host is down (bounded): the ground truth is final then."""
    deadline = time.monotonic() + _QUIET_TIMEOUT_S
    while time.monotonic() < deadline:
        with fleet.lock:
            fleet.scheduler.run_due()
            down = any(h.down for h in fleet.hosts.values())
        if not down and fleet.quiet():
            return
        time.sleep(0.2)


def _wait_available(api: ControllerApi, fleet: SimFleet, timeout: float) -> int:
    """Until the controller lists every host that is up as Available (bounded); how many are not."""
    deadline = time.monotonic() + timeout
    while True:
        listing = api.ok("GET", "/providers/Cvmotion.Fabric/hosts")
        states = {h["name"]: h["properties"]["state"] for h in listing.get("value", [])}
        with fleet.lock:
            behind = [n for n, h in fleet.hosts.items() if not h.down and states.get(n) != "Available"]
        if not behind or time.monotonic() > deadline:
            return len(behind)
        time.sleep(2.0)
