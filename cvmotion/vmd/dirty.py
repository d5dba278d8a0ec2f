"""vmd: a VM's dirty log as its two consumers see it — the migration engine and the secure processor."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from cvmotion.abi.gfns import sorted_union
from cvmotion.errors import UsageError
from cvmotion.vmm.vm import Vm

__all__ = ["DirtyViews"]


class DirtyViews:
    """Two consumers of one hardware dirty log: the migration engine and the secure processor.

    Every harvest of the KVM (or unicorn) log feeds both views, so the firmware learns about every write the
    engine learns about, and vice versa — the firmware's "exported and clean" check stays exact.  A consumer
    with a ``feeds`` callable is handed each harvest at once (the SP: its view lives in the platform process,
    so folding it before each bundle is local there); the harvest reaches it before the harvesting consumer
    has it, so the engine can never ask the SP to export a page the SP does not yet know is dirty.

    The SP's view only grows until the SP takes it: no call the (untrusted) daemon can make drops a bit.
    ``start`` turns the hardware log on once and then only moves the engine's baseline (its harvest still
    feeds the SP); a harvest the SP could not be handed is kept and offered again with the next one.
    """

    CONSUMERS = ("engine", "sp")

    def __init__(self, vm: Vm, feeds: dict[str, Callable[[npt.NDArray[np.uint64]], object]] | None = None) -> None:
        self._vm = vm
        self._lock = threading.Lock()
        self._pending: dict[str, list[npt.NDArray[np.uint64]]] = {c: [] for c in self.CONSUMERS}
        self._feeds = dict(feeds or {})
        self._unfed: list[npt.NDArray[np.uint64]] = []  # harvested, but a feed failed: nobody has these yet
        self.tracking = False

    def start(self) -> None:
        """Dirty tracking on (the first call; the log then stays on) and a new baseline for the engine.

        Clears nothing: the first harvest holds every populated page (``Vm.start_dirty_tracking``), and the
        harvest made here reaches the SP before the engine's copy is dropped.
        """
        with self._lock:
            if not self.tracking:
                self._vm.start_dirty_tracking()
                self.tracking = True
        self.take("engine")

    def take(self, consumer: str, *, fresh: bool = True) -> npt.NDArray[np.uint64]:
        with self._lock:
            if not self.tracking:
                raise UsageError("dirty tracking has not been started")
            parts = self._pending[consumer]
            if fresh:
                new = self._vm.harvest_dirty().gfns()
                if self._unfed:
                    new = sorted_union(new, *self._unfed)
                if len(new):
                    # Keep the harvest until every feed took it: a feed that raises leaves it for the next take.
                    self._unfed = [new]
                    for other, pending in self._pending.items():
                        if other == consumer:
                            continue
                        feed = self._feeds.get(other)
                        if feed is not None:
                            feed(new)  # raises if the other consumer cannot be told: nobody gets this harvest now
                        else:
                            pending.append(new)
                    self._unfed = []
                    parts.append(new)
            self._pending[consumer] = []
        if not parts:
            return np.zeros(0, dtype=np.uint64)
        return sorted_union(*parts)
