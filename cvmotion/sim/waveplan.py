"""sim layer: what a wave is asked to do and what it did — options, per-host results, per-VM steps."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["HostResult", "VmStep", "WaveOptions", "WaveResult"]


@dataclass(frozen=True, slots=True)
class WaveOptions:
    per_host: int = 2
    rounds: int = 3
    failures: int = 0
    failure_wall_s: tuple[float, float] = (10.0, 40.0)  # how long a failed host stays down (wall seconds)
    host_timeout_s: float = 900.0
    seed: int = 0
    driver: str = "auto"
    notice_s: float = 5.0  # noticeSeconds of each drain (wall seconds: the controller's clock is not compressed)


@dataclass(frozen=True, slots=True)
class VmStep:
    vm: str
    host: str
    method: str  # LiveMigration | None (refused or failed: the in-place update covers it)
    outcome: str  # Succeeded | Failed | Blocked
    reason: str = ""
    target: str = ""


@dataclass
class HostResult:
    host: str
    domain: str
    started: float
    ended: float = 0.0
    status: str = "Succeeded"
    steps: list[VmStep] = field(default_factory=list)
    inplace: int = 0
    error: str = ""


@dataclass
class WaveResult:
    mode: str
    started: float
    ended: float
    virtual_started: float
    virtual_ended: float
    domains: list[tuple[str, float, float, str]]  # (fault domain, wall start, wall end, reason)
    hosts: list[HostResult]
    failed_hosts: list[str]
