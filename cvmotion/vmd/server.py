"""vmd: the VM process's command tables — the daemon's commands and the secure processor's, one handler each.

``serve_control`` answers the host daemon (untrusted) on ``control.sock``; ``serve_hardware`` answers the platform
process on the VM's own connection to it.  A method outside the caller's enum (``vmd.protocol``) is refused
before any handler runs; what a handler returns to the daemon is run state, page numbers, device I/O and public
attestation data, never guest memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

from cvmotion.errors import UsageError
from cvmotion.ipc import trace
from cvmotion.ipc.rpc import Call, Handler, Reply
from cvmotion.vmd.process import VmProcess
from cvmotion.vmd.protocol import ControlCommand, HardwareCommand, Resumed, Resumption

__all__ = ["install"]

_Table = dict[str, Callable[[VmProcess, Call], Reply]]


def _done(action: Callable[[VmProcess], object]) -> Callable[[VmProcess, Call], Reply]:
    def handler(proc: VmProcess, call: Call) -> Reply:
        action(proc)
        return Reply()

    return handler


def _int(call: Call, key: str) -> int:
    value = call.args.get(key)
    if type(value) is not int:
        raise UsageError(f"{call.method}: {key!r} must be an integer")
    return value


def _float(call: Call, key: str, default: float) -> float:
    value = call.args.get(key, default)
    if type(value) not in (int, float):
        raise UsageError(f"{call.method}: {key!r} must be a number")
    return float(value)


def _scheduled_events(proc: VmProcess, call: Call) -> Reply:
    proc.set_scheduled_events(call.blob)
    return Reply()


def _resumed(done: Resumption) -> Reply:
    paused = done.paused
    result = Resumed(pause_ms=None if paused is None else round(paused * 1000, 3), resumed_at=done.at)
    return Reply(dict(result), after=done.then)


def _bind(proc: VmProcess, call: Call) -> Reply:
    proc.handle = _int(call, "handle")  # only what the VM process asks the SP about: the SP answers for its own
    return Reply()


def _harvest(proc: VmProcess, call: Call) -> Reply:
    gfns = proc.require_dirty().take("engine")
    return Reply({"count": len(gfns)}, gfns.astype("<u8").tobytes())


def _populated(proc: VmProcess, call: Call) -> Reply:
    if proc.memory is None:
        raise UsageError("this VM process has no guest memory yet")
    return Reply({"ranges": [list(r) for r in proc.memory.populated_ranges()]})


def _throttle(proc: VmProcess, call: Call) -> Reply:
    proc.set_throttle(_int(call, "pct"))
    return Reply()


def _cvmio(proc: VmProcess, call: Call) -> Reply:
    vm = proc.vm
    if vm is None:
        raise UsageError("this VM is waiting for an incoming migration")
    return Reply({}, vm.cvmio.submit(call.blob, _float(call, "timeout", 5.0)))


_CONTROL: _Table = {
    ControlCommand.INFO: lambda proc, call: Reply(dict(proc.info())),
    ControlCommand.CONFIGURE: lambda proc, call: Reply(dict(proc.configure(Path(str(call.args.get("dir")))))),
    ControlCommand.ATTESTATION: lambda proc, call: Reply(dict(proc.attestation())),
    ControlCommand.LAUNCH_RANGES: lambda proc, call: Reply({"ranges": [list(r) for r in proc.launch_ranges()]}),
    ControlCommand.BIND: _bind,
    ControlCommand.START: _done(VmProcess.start),
    ControlCommand.PAUSE: lambda proc, call: Reply({"latency": proc.pause()}),
    ControlCommand.RESUME: lambda proc, call: _resumed(proc.resume()),
    ControlCommand.START_DIRTY_TRACKING: _done(VmProcess.start_dirty_tracking),
    ControlCommand.HARVEST_DIRTY: _harvest,
    ControlCommand.POPULATED_RANGES: _populated,
    ControlCommand.CONSOLE: lambda proc, call: Reply(dict(proc.console(int(call.args.get("since", 0))))),
    ControlCommand.CVMIO: _cvmio,
    ControlCommand.THROTTLE: _throttle,
    ControlCommand.STOP: _done(VmProcess.stop_soon),
    ControlCommand.REATTEST: lambda proc, call: Reply(dict(proc.reattest())),
    ControlCommand.SCHEDULED_EVENTS: _scheduled_events,
}


def _restore(proc: VmProcess, call: Call) -> Reply:
    """Build the VM from the imported state; ``run``: then run it (the SP activated it in this same command, so a
    separate call to run would be one more round trip inside the blackout)."""
    vcpu_len = _int(call, "vcpu_len")
    if not 0 <= vcpu_len <= len(call.blob):
        raise UsageError(f"restore: vCPU state of {vcpu_len} bytes in a blob of {len(call.blob)}")
    state = proc.restore(_int(call, "handle"), call.blob[:vcpu_len])
    if call.args.get("run") is not True:
        return Reply({"state": state})
    done = proc.run_for_sp()
    return Reply({"state": state, "resumed_at": done.at}, after=done.then)


def _capture(proc: VmProcess, call: Call) -> Reply:
    """The paused VM's state (one blob: vCPUs and devices); ``harvest``: then a fresh harvest of the SP's dirty
    view, appended (the start token's last look at the log, in the same round trip as the capture)."""
    state = proc.capture_state()
    if not call.args.get("harvest"):
        return Reply({"vcpu_len": len(state)}, state)
    gfns = proc.require_dirty().take("sp", fresh=True).astype("<u8").tobytes()
    return Reply({"vcpu_len": len(state), "device_len": 0}, state + gfns)


def _switchover(proc: VmProcess, call: Call) -> Reply:
    """The source's stop-and-copy, hardware side, in one round trip: pause the vCPUs (and the DMA device) as the
    daemon's pause does, hold them for the SP, capture their state, then harvest the SP's dirty view.  The harvest
    comes last, so it covers every write up to the capture."""
    proc.pause()
    paused_at = time.time()  # the vCPUs are stopped: the start of the blackout the guest sees (QEMU's STOP)
    proc.hold_paused()
    with trace.span("vm capture"):
        state = proc.capture_state()
    with trace.span("vm harvest"):
        gfns = proc.require_dirty().take("sp", fresh=True).astype("<u8").tobytes()
    return Reply({"vcpu_len": len(state), "device_len": 0, "paused_at": paused_at}, state + gfns)


def _hold(proc: VmProcess, call: Call) -> Reply:
    """Hold the paused VM for the SP, then harvest the SP's dirty view (the pages still to export)."""
    proc.hold_paused()
    return Reply({}, proc.require_dirty().take("sp", fresh=True).astype("<u8").tobytes())


_HARDWARE: _Table = {
    HardwareCommand.TAKE_DIRTY: lambda proc, call: Reply(
        {}, proc.require_dirty().take("sp", fresh=bool(call.args.get("fresh"))).astype("<u8").tobytes()
    ),
    HardwareCommand.HOLD_PAUSED: _hold,
    HardwareCommand.CAPTURE_STATE: _capture,
    HardwareCommand.SWITCHOVER: _switchover,
    HardwareCommand.RESTORE_STATE: _restore,
}


def _serving(proc: VmProcess, table: Mapping[str, Callable[[VmProcess, Call], Reply]], caller: str) -> Handler:
    """The handler of one caller's commands for ``proc``: the table, keyed by its enum (str members), is the
    allowlist."""

    def handler(call: Call) -> Reply:
        serve = table.get(call.method)
        if serve is None:
            raise UsageError(f"{call.method!r} is not a command the {caller} may send a VM process")
        return serve(proc, call)

    return handler


def install(proc: VmProcess) -> VmProcess:
    """Give ``proc`` its command tables (before it connects to the platform or serves the daemon)."""
    proc.control_handler = _serving(proc, _CONTROL, "host daemon")
    proc.hardware_handler = _serving(proc, _HARDWARE, "secure processor")
    return proc
