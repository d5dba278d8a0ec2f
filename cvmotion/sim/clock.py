"""sim layer: the virtual clock — host-side durations run ``speed`` times faster than the wall clock.

Only the simulated hosts live in virtual time (a migration drawn at 1.2 s completes 1.2 / ``speed`` wall
seconds after it started); the controller, its database and its timers run at their real pace, so what a
compressed run measures is the controller's own cost with the hosts' waits shortened.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["VirtualClock"]


class VirtualClock:
    """Virtual seconds since ``start``: (wall seconds elapsed) x ``speed``."""

    def __init__(self, speed: float, wall: Callable[[], float] = time.monotonic) -> None:
        if not speed > 0:
            raise ValueError(f"speed must be positive, not {speed}")
        self.speed = speed
        self._wall = wall
        self._t0 = wall()

    def now(self) -> float:
        return (self._wall() - self._t0) * self.speed

    def wall_until(self, virtual: float) -> float:
        """Wall seconds from now until virtual instant ``virtual`` (0 when it has passed)."""
        return max(0.0, (virtual - self.now()) / self.speed)

    def wall_now(self) -> float:
        return self._wall()
