"""ipc: interpreter settings for the processes on a switchover's critical path (daemon, platform/SP, VM).

Each of them runs several Python threads; a call that arrives while another thread computes waits for the GIL,
by default for up to ``sys.getswitchinterval()`` = 5 ms, and a cyclic garbage collection started by any thread
holds every other one for as long as it walks the heap.  Traced switchovers (``bench/switchover_profile.py``)
showed calls queued 2-3.5 ms inside the blackout for exactly that reason.  So these processes hand the GIL over
after 0.5 ms, and move what they allocated while starting (modules, certificates, tables) out of the
collector's way (``gc.freeze``, the CPython documentation's advice for long-running servers).
"""

from __future__ import annotations

import gc
import sys

__all__ = ["SWITCH_INTERVAL", "tune_for_latency"]

SWITCH_INTERVAL = 0.0005  # seconds


def tune_for_latency() -> None:
    """Call once start-up is done, before serving."""
    sys.setswitchinterval(SWITCH_INTERVAL)
    gc.collect()
    gc.freeze()
