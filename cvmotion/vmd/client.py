"""vmd: typed clients of the VM process protocol (``vmd.protocol``), one method per command.

``VmClient`` is the host daemon's handle on one VM process (run control, dirty page numbers, console, cvm-io);
``HardwareClient`` is the secure processor's (dirty view, hold, state capture and restore); ``RelayClient`` is the
VM process's way back to the daemon (guest-message relay, events).  Nothing else sends these commands.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from cvmotion.errors import ProtocolError, UsageError
from cvmotion.ipc.rpc import Endpoint, Handler, connect_unix
from cvmotion.vmd.protocol import (
    AttestationInfo,
    BindArgs,
    ConfigureArgs,
    ConsoleArgs,
    ConsolePage,
    ControlCommand,
    CvmioArgs,
    EventArgs,
    GuestRequestArgs,
    HardwareCommand,
    Reattested,
    RelayCommand,
    RestoreStateArgs,
    Resumed,
    ScheduledEventsPostArgs,
    TakeDirtyArgs,
    ThrottleArgs,
    VmInfo,
)

__all__ = ["GFN_DTYPE", "HardwareClient", "RelayClient", "VmClient", "gfns_from_blob"]

GFN_DTYPE = "<u8"


def gfns_from_blob(blob: bytes) -> npt.NDArray[np.uint64]:
    """A list of u64 GFNs as the protocol carries them (little-endian)."""
    if len(blob) % 8:
        raise ProtocolError(f"{len(blob)} bytes is not a list of u64 GFNs")
    return np.frombuffer(blob, dtype=GFN_DTYPE).astype(np.uint64)


@dataclass
class VmClient:
    """The host's view of one VM process."""

    name: str
    endpoint: Endpoint

    @classmethod
    def connect(cls, name: str, path: str, handler: Handler | None = None) -> VmClient:
        return cls(name, connect_unix(path, handler, name=f"host->vm-{name}"))

    @property
    def closed(self) -> bool:
        return self.endpoint.closed

    def _call(
        self, command: ControlCommand, args: Any = None, blob: bytes = b"", *, timeout: float | None = 60.0
    ) -> tuple[dict[str, Any], bytes]:
        result, data, _ = self.endpoint.call(command.value, dict(args or {}), blob, timeout=timeout)
        return result, data

    def info(self, *, timeout: float | None = 60.0) -> VmInfo:
        return cast(VmInfo, self._call(ControlCommand.INFO, timeout=timeout)[0])

    def configure(self, vm_dir: Path, *, timeout: float | None = 60.0) -> VmInfo:
        """A standby becomes the VM described by ``vm_dir/vm.json``."""
        return cast(VmInfo, self._call(ControlCommand.CONFIGURE, ConfigureArgs(dir=str(vm_dir)), timeout=timeout)[0])

    def attestation(self) -> AttestationInfo:
        return cast(AttestationInfo, self._call(ControlCommand.ATTESTATION)[0])

    def launch_ranges(self) -> list[tuple[int, int]]:
        """The GPA ranges the launch measures (the image's segments and the boot information)."""
        return [(int(gpa), int(length)) for gpa, length in self._call(ControlCommand.LAUNCH_RANGES)[0]["ranges"]]

    def bind(self, handle: int) -> None:
        self._call(ControlCommand.BIND, BindArgs(handle=handle))

    def start(self) -> None:
        self._call(ControlCommand.START)

    def pause(self) -> float:
        """Pause the vCPUs; returns how long that took (seconds)."""
        return float(self._call(ControlCommand.PAUSE)[0]["latency"])

    def resume(self, *, timeout: float | None = 60.0) -> float | None:
        """Let the vCPUs run again; returns how long they were stopped (seconds, monotonic), when known."""
        pause_ms = cast(Resumed, self._call(ControlCommand.RESUME, timeout=timeout)[0]).get("pause_ms")
        return None if pause_ms is None else float(pause_ms) / 1000

    def reattest(self, *, timeout: float | None = 60.0) -> Reattested:
        """Have the paravisor attest again (a fresh report from the SP): after the platform process was replaced."""
        return cast(Reattested, self._call(ControlCommand.REATTEST, timeout=timeout)[0])

    def scheduled_events(self, document: bytes) -> None:
        """Put the VM's Scheduled Events document in its cvm-io mailbox (the guest reads it there)."""
        self._call(ControlCommand.SCHEDULED_EVENTS, blob=document)

    def start_dirty_tracking(self) -> None:
        self._call(ControlCommand.START_DIRTY_TRACKING)

    def harvest_dirty(self) -> npt.NDArray[np.uint64]:
        return gfns_from_blob(self._call(ControlCommand.HARVEST_DIRTY)[1])

    def populated_gfns(self) -> npt.NDArray[np.uint64]:
        ranges = self._call(ControlCommand.POPULATED_RANGES)[0]["ranges"]
        parts = [np.arange(int(gpa) >> 12, (int(gpa) + int(length)) >> 12, dtype=np.uint64) for gpa, length in ranges]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)

    def console(self, since: int = 0) -> ConsolePage:
        return cast(ConsolePage, self._call(ControlCommand.CONSOLE, ConsoleArgs(since=since))[0])

    def cvmio(self, request: bytes, timeout: float) -> bytes:
        """One cvm-io request to the guest; its response (the guest has ``timeout`` seconds to answer)."""
        return self._call(ControlCommand.CVMIO, CvmioArgs(timeout=timeout), request, timeout=max(60.0, timeout + 5))[1]

    def throttle(self, pct: int) -> None:
        self._call(ControlCommand.THROTTLE, ThrottleArgs(pct=pct))

    def stop(self) -> None:
        self._call(ControlCommand.STOP)

    def close(self) -> None:
        self.endpoint.close()


class HardwareClient:
    """The secure processor's view of one VM process (its hardware)."""

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint

    def take_dirty(self, *, fresh: bool) -> npt.NDArray[np.uint64]:
        """The SP's dirty view; ``fresh`` harvests the hardware log first (the engine's view gets it too)."""
        _, blob, _ = self._endpoint.call(HardwareCommand.TAKE_DIRTY.value, dict(TakeDirtyArgs(fresh=fresh)))
        return gfns_from_blob(blob)

    def hold_paused(self) -> npt.NDArray[np.uint64]:
        """Hold the paused VM, then harvest: the SP's dirty view with a fresh harvest (as ``take_dirty``)."""
        return gfns_from_blob(self._endpoint.call(HardwareCommand.HOLD_PAUSED.value)[1])

    def capture_state(self) -> tuple[bytes, bytes]:
        """(vCPU state, device state) of the paused VM."""
        result, blob, _ = self._endpoint.call(HardwareCommand.CAPTURE_STATE.value)
        n = int(result["vcpu_len"])
        return blob[:n], blob[n:]

    def capture_and_harvest(self) -> tuple[bytes, bytes, npt.NDArray[np.uint64]]:
        """``capture_state`` and then a fresh ``take_dirty``, in one round trip."""
        return _captured(*self._endpoint.call(HardwareCommand.CAPTURE_STATE.value, {"harvest": True})[:2])

    def pause_capture_harvest(self) -> tuple[bytes, bytes, npt.NDArray[np.uint64], float]:
        """Pause and hold the VM, capture its state, then a fresh ``take_dirty``: one round trip. The fourth value
        is the Unix time the VM process had the vCPUs stopped."""
        result, blob, _ = self._endpoint.call(HardwareCommand.SWITCHOVER.value)
        return (*_captured(result, blob), float(result["paused_at"]))

    def restore_state(self, handle: int, vcpu_state: bytes, device_state: bytes, *, run: bool = False) -> float | None:
        """Restore the imported state; ``run``: then run the guest, and return the Unix time its vCPUs were released."""
        args = RestoreStateArgs(handle=handle, vcpu_len=len(vcpu_state))
        if run:
            args["run"] = True
        result = self._endpoint.call(HardwareCommand.RESTORE_STATE.value, dict(args), vcpu_state + device_state)[0]
        return float(result["resumed_at"]) if run else None


class RelayClient:
    """A VM process's calls to the host daemon (over the newest live control connection)."""

    def __init__(self, endpoints: list[Endpoint], *, timeout: float = 30.0) -> None:
        self._endpoints = endpoints
        self._timeout = timeout

    def _call(self, command: RelayCommand, args: Any, blob: bytes = b"") -> tuple[dict[str, Any], bytes]:
        for endpoint in reversed(self._endpoints):
            if not endpoint.closed:
                result, data, _ = endpoint.call(command.value, dict(args), blob, timeout=self._timeout)
                return result, data
        raise UsageError("no host daemon is connected")

    def guest_request(self, handle: int | None, message: bytes) -> bytes:
        if handle is None:
            raise UsageError("this VM runs no guest yet: no guest request to relay")
        return self._call(RelayCommand.GUEST_REQUEST, GuestRequestArgs(handle=handle), message)[1]

    def ext_certs(self) -> bytes:
        return self._call(RelayCommand.EXT_CERTS, {})[1]

    def event(self, kind: str, data: dict[str, Any], vm: str) -> None:
        self._call(RelayCommand.EVENT, EventArgs(type=kind, data=data, vm=vm))

    def scheduled_events_post(self, vm: str, body: bytes) -> None:
        """What the guest posted to its Scheduled Events mailbox (its StartRequests), for the daemon's store."""
        self._call(RelayCommand.SCHEDULED_EVENTS_POST, ScheduledEventsPostArgs(vm=vm), body)


def _captured(result: dict[str, Any], blob: bytes) -> tuple[bytes, bytes, npt.NDArray[np.uint64]]:
    """(vCPU state, device state, harvested GFNs) of a capture answer, its lengths checked against the blob."""
    n, m = int(result["vcpu_len"]), int(result.get("device_len", -1))
    if not 0 <= n <= len(blob) or not 0 <= m <= len(blob) - n or (len(blob) - n - m) % 8:
        raise ProtocolError(f"capture: lengths {n}/{m} do not fit a blob of {len(blob)} bytes")
    return blob[:n], blob[n : n + m], gfns_from_blob(blob[n + m :])
