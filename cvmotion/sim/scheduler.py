"""sim layer: discrete events in virtual time, fired in order by one thread under the fleet's lock.

A migration's switchover and commit, an in-place update's pause and resume, a host failing and coming
back: each is an event at a virtual instant, and its callback receives that instant, so the ground truth
records when things happened in the simulated world, not when the thread woke up.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections.abc import Callable

from cvmotion.sim.clock import VirtualClock

__all__ = ["Scheduler"]

log = logging.getLogger("cvmotion.sim")
_IDLE_WAIT_S = 0.2  # longest wall wait between looks at the queue (bounded waits; a stop is seen at once)


class Scheduler:
    def __init__(self, clock: VirtualClock, lock: threading.RLock) -> None:
        self.clock = clock
        self._cond = threading.Condition(lock)
        self._heap: list[tuple[float, int, Callable[[float], None]]] = []
        self._seq = itertools.count()
        self.fired = 0
        self.errors: list[str] = []

    def at(self, when: float, action: Callable[[float], None]) -> None:
        """Run ``action(when)`` at virtual second ``when`` (the caller may hold the lock; it is re-entrant)."""
        with self._cond:
            heapq.heappush(self._heap, (when, next(self._seq), action))
            self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return len(self._heap)

    def run_due(self) -> None:
        """Fire every event whose instant has passed (the caller holds the lock)."""
        now = self.clock.now()
        while self._heap and self._heap[0][0] <= now:
            when, _, action = heapq.heappop(self._heap)
            try:
                action(when)
            except Exception as exc:  # one broken event must not stop the world; the report shows it
                log.exception("simulated event at %.3f failed", when)
                self.errors.append(f"{when:.3f}: {type(exc).__name__}: {exc}")
            self.fired += 1

    def run(self, stop: threading.Event) -> None:
        with self._cond:
            while not stop.is_set():
                self.run_due()
                wait = self.clock.wall_until(self._heap[0][0]) if self._heap else _IDLE_WAIT_S
                self._cond.wait(min(max(wait, 0.0005), _IDLE_WAIT_S))
