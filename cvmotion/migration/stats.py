"""migration layer: statistics and states, named as QEMU's ``query-migrate`` names them.

``MigrationStats.query_migrate()`` returns the QMP shape (``status``, ``total-time``, ``downtime``,
``setup-time``, ``expected-downtime``, ``ram: {transferred, remaining, total, duplicate, normal,
normal-bytes, dirty-sync-count, dirty-pages-rate, mbps, pages-per-second, precopy-bytes,
downtime-bytes}``, ``cpu-throttle-percentage``) plus cvmotion's own keys under ``x-cvmotion``.
Times are milliseconds, as in QMP.  Bandwidth is measured every 100 ms over the bytes the engine handed
to the network.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BandwidthMeter", "MigrationOutcome", "MigrationStats", "MigrationStatus", "RoundStats", "Verdict"]


class MigrationStatus(enum.Enum):
    """QEMU's MigrationStatus values that apply here."""

    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    DEVICE = "device"  # the source is paused; final pages and state are in flight
    POSTCOPY_ACTIVE = "postcopy-active"  # unused: no post-copy for confidential VMs
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def settled(self) -> bool:
        """Final: the migration will not move again (its bookkeeping may still be finishing)."""
        return self in (MigrationStatus.COMPLETED, MigrationStatus.FAILED, MigrationStatus.CANCELLED)


class MigrationOutcome(enum.StrEnum):
    """Where the VM is once a migration ended (``x-cvmotion.outcome``); the values are what the API prints."""

    NONE = ""
    RUNNING_ON_DESTINATION = "running on destination"
    RESUMED_ON_SOURCE = "resumed on source"
    AWAITING_DESTINATION = "stopped, awaiting destination"  # frozen source: only a token moves it
    COMMITTED_NOT_RUNNING = "committed; destination VM not running"
    IMPORT_FAILED = "import failed; source may resume with the abort token"


class Verdict(enum.StrEnum):
    """A destination's answer about an incoming migration (``GET /v1/migrations/{id}/outcome``). Only the two
    final ones carry a token (commit receipt or abort token) and only the token, checked by the source's
    firmware, means anything."""

    IN_PROGRESS = "in-progress"
    COMMITTED = "committed"
    ABORTED = "aborted"
    FAILED = "failed"  # gave up with no abort token to show (the source stays stopped)


class BandwidthMeter:
    """Bytes per second over a sliding window, sampled at most every ``period`` seconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, period: float = 0.1, window: int = 10) -> None:
        self._clock = clock
        self._period = period
        self._lock = threading.Lock()
        self._total = 0
        self._samples: deque[tuple[float, int]] = deque(maxlen=window)
        self._samples.append((clock(), 0))
        self.bytes_per_second = 0.0

    def add(self, nbytes: int) -> None:
        with self._lock:
            self._total += nbytes
            now = self._clock()
            if now - self._samples[-1][0] >= self._period:
                self._samples.append((now, self._total))
                t0, b0 = self._samples[0]
                if now > t0:
                    self.bytes_per_second = (self._total - b0) / (now - t0)

    @property
    def total(self) -> int:
        return self._total


@dataclass(slots=True)
class RoundStats:
    """One pre-copy round (one epoch)."""

    round: int
    pages: int
    zero_pages: int
    bytes: int
    seconds: float
    dirty_after: int
    throttle: int = 0  # auto-converge's vCPU throttle (%) while the round ran


@dataclass(slots=True)
class MigrationStats:
    """Live counters of one migration; thread-safe enough for one writer and many readers."""

    id: str
    vm: str
    source: str = ""
    destination: str = ""
    status: MigrationStatus = MigrationStatus.SETUP
    started_at: float = field(default_factory=time.time)
    start_mono: float = field(default_factory=time.monotonic)
    setup_ms: float = 0.0
    total_ms: float = 0.0
    downtime_ms: float = 0.0
    expected_downtime_ms: float = 0.0
    memory_total: int = 0
    transferred: int = 0
    precopy_bytes: int = 0
    downtime_bytes: int = 0
    remaining: int = 0
    normal_pages: int = 0
    zero_pages: int = 0
    dirty_sync_count: int = 0
    dirty_pages_rate: float = 0.0
    mbps: float = 0.0
    throttle_pct: int = 0
    streams: int = 1
    rounds: list[RoundStats] = field(default_factory=list)
    downtime_phases: dict[str, float] = field(default_factory=dict)  # ms from the pause, per switchover step
    error: str | None = None
    error_kind: str | None = None
    outcome: MigrationOutcome = MigrationOutcome.NONE
    forced_switchover: bool = False  # pre-copy hit max_rounds without converging
    # Unix time at the switchover's pause (source) and at the VM's resume (destination): on one host clock the
    # two give the guest's blackout as QEMU's STOP/RESUME events do, without the commit's trip back.
    paused_at: float | None = None
    resumed_at: float | None = None
    attestation: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    def elapsed_ms(self) -> float:
        return (time.monotonic() - self.start_mono) * 1000.0

    def query_migrate(self) -> dict[str, Any]:
        """The QMP ``query-migrate`` object (plus ``x-cvmotion``)."""
        total = (
            self.total_ms if self.status in (MigrationStatus.COMPLETED, MigrationStatus.FAILED) else self.elapsed_ms()
        )
        out: dict[str, Any] = {
            "status": self.status.value,
            "total-time": round(total),
            "setup-time": round(self.setup_ms),
            "expected-downtime": round(self.expected_downtime_ms),
            "cpu-throttle-percentage": self.throttle_pct,
            "ram": {
                "transferred": self.transferred,
                "remaining": self.remaining,
                "total": self.memory_total,
                "duplicate": self.zero_pages,
                "normal": self.normal_pages,
                "normal-bytes": self.normal_pages * 4096,
                "dirty-sync-count": self.dirty_sync_count,
                "dirty-pages-rate": round(self.dirty_pages_rate),
                "mbps": round(self.mbps, 3),
                "pages-per-second": round(self.mbps * 1e6 / 8 / 4096) if self.mbps else 0,
                "precopy-bytes": self.precopy_bytes,
                "downtime-bytes": self.downtime_bytes,
            },
            "x-cvmotion": {
                "id": self.id,
                "vm": self.vm,
                "source": self.source,
                "destination": self.destination,
                "streams": self.streams,
                "encrypted": True,
                "rounds": [
                    {
                        "round": r.round,
                        "pages": r.pages,
                        "zero-pages": r.zero_pages,
                        "bytes": r.bytes,
                        "ms": round(r.seconds * 1000, 2),
                        "dirty-after": r.dirty_after,
                        "throttle": r.throttle,
                    }
                    for r in self.rounds
                ],
                "outcome": self.outcome,
                "forced-switchover": self.forced_switchover,
                "attestation": self.attestation,
            },
        }
        if self.status is MigrationStatus.COMPLETED:
            out["downtime"] = round(self.downtime_ms)
            out["x-cvmotion"]["downtime-ms"] = round(self.downtime_ms, 2)
            out["x-cvmotion"]["total-time-ms"] = round(self.total_ms, 2)
            out["x-cvmotion"]["downtime-phases-ms"] = {k: round(v, 2) for k, v in self.downtime_phases.items()}
        if self.paused_at is not None:
            out["x-cvmotion"]["paused-at"] = self.paused_at
        if self.resumed_at is not None:
            out["x-cvmotion"]["resumed-at"] = self.resumed_at
        if self.error:
            out["error-desc"] = self.error
            out["x-cvmotion"]["error-kind"] = self.error_kind
        return out
