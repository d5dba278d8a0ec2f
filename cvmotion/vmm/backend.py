"""vmm layer: the seam between ``Vm`` and a CPU backend (KVM or the unicorn emulator), and what they share.

A backend runs vCPUs over a ``GuestMemory`` and a port I/O bus, pauses them with bounded latency,
tracks the pages the *guest* dirties (the VMM's own writes are tracked by ``GuestMemory``), and captures
or restores CPU state.  ``Vm`` owns everything else (devices, memory, snapshot format).

::

    CREATED ──start()──► RUNNING ◄──resume()── PAUSED
                           │ └──────pause()──────►│
                           ▼                      │
                        STOPPED (GuestStop: exit port, halt, fault) ◄── close()
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from cvmotion.vmm.dirty import DirtyLog
from cvmotion.vmm.loader import BootInfo

__all__ = ["Backend", "BackendKind", "GuestStop", "PauseGate", "StopKind"]


class BackendKind(enum.Enum):
    KVM = "kvm"
    EMULATED = "emulated"


class StopKind(enum.Enum):
    SHUTDOWN = "shutdown"  # the guest wrote the exit port: a clean, requested stop
    HALTED = "halted"  # hlt with interrupts disabled: nothing can ever wake it
    TRIPLE_FAULT = "triple-fault"
    CPU_EXCEPTION = "cpu-exception"  # the emulator does not deliver exceptions through the IDT
    INTERNAL_ERROR = "internal-error"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class GuestStop:
    """Why the VM stopped; ``rip`` is the last instruction pointer when a vCPU faulted."""

    kind: StopKind
    message: str
    rip: int | None = None
    exit_code: int | None = None
    vcpu: int = 0

    @property
    def is_error(self) -> bool:
        return self.kind in (StopKind.TRIPLE_FAULT, StopKind.CPU_EXCEPTION, StopKind.INTERNAL_ERROR)


class PauseGate:
    """The pause handshake between the controlling thread and the vCPU threads.

    ``request()`` raises the flag; each vCPU thread that notices it calls ``park()`` and blocks there;
    ``wait_parked(n)`` returns once ``n`` threads are parked or have ended (``exited()``);
    ``release()`` lets them go.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._requested = False
        self._parked = 0
        self._exited = 0
        self._stopping = False

    @property
    def requested(self) -> bool:
        return self._requested

    def request(self) -> None:
        with self._cond:
            self._requested = True

    def park(self) -> None:
        with self._cond:
            self._parked += 1
            self._cond.notify_all()
            while self._requested and not self._stopping:
                self._cond.wait()
            self._parked -= 1
            self._cond.notify_all()

    def exited(self) -> None:
        with self._cond:
            self._exited += 1
            self._cond.notify_all()

    def wait_parked(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._parked + self._exited < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def release(self) -> None:
        with self._cond:
            self._requested = False
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()


class Backend(Protocol):
    """What ``Vm`` needs from a CPU backend.  ``capture``/``restore`` exchange backend-specific state."""

    kind: BackendKind

    def setup_boot(self, boot: BootInfo) -> None:
        """Put the bootstrap processor in the multiboot entry state (spec 3.2)."""

    def start(self, paused: bool = False) -> None:
        """Start the vCPU threads; ``paused``: they park before running any guest code (restore)."""

    def pause(self, timeout: float) -> None:
        """Return once every vCPU is out of guest mode with no half-done I/O.

        Raises:
            KvmError: a vCPU did not park within ``timeout``.
        """

    def resume(self) -> None: ...

    def wait_stop(self, timeout: float | None) -> GuestStop | None: ...

    def request_stop(self, stop: GuestStop) -> None:
        """Stop every vCPU for ``stop`` (a device asked: the exit port)."""

    @property
    def stop_reason(self) -> GuestStop | None: ...

    def tsc_khz(self) -> int: ...

    def start_dirty_tracking(self) -> None: ...

    def harvest_dirty(self) -> DirtyLog:
        """Pages the guest wrote since tracking started or the previous harvest; clears the log."""

    def invalidate_code(self, gpa: int, length: int) -> None:
        """The VMM rewrote guest memory: drop cached translations (emulator) of that range."""

    def capture(self) -> object: ...

    def restore(self, state: object) -> None: ...

    def close(self) -> None: ...
