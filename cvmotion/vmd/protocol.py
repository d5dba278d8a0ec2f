"""vmd: the VM process's command protocol — what each caller may send it, and what crosses back.

A VM process (``python -m cvmotion.vmd``) is hardware in the trust model; three callers talk to it, each over its
own connection and each with its own command enum, which *is* that caller's allowlist (a method outside it is
refused before any handler runs)::

    host daemon (untrusted) --ControlCommand--> VM process          vms/<name>/control.sock
    VM process --RelayCommand--> host daemon                          (the same connection, the other way)
    platform process (SP) --HardwareCommand--> VM process            the VM's platform.sock connection

Each command has a typed request (the ``*Args`` TypedDict, its RPC header arguments) and a typed answer. Only
page numbers, device I/O, public attestation data and run state cross to the daemon; guest memory never does
(the SP maps the memfd itself). Pure data: this module imports nothing of the VMM, so the untrusted host can
speak the protocol without the hardware's code.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, Required, TypedDict

__all__ = [
    "AttestationInfo",
    "BindArgs",
    "ConfigureArgs",
    "ConsoleArgs",
    "ConsolePage",
    "ControlCommand",
    "CvmioArgs",
    "EventArgs",
    "GuestRequestArgs",
    "HardwareCommand",
    "LaunchRanges",
    "PopulatedRanges",
    "Reattested",
    "RelayCommand",
    "RestoreStateArgs",
    "Resumed",
    "Resumption",
    "ScheduledEventsPostArgs",
    "TakeDirtyArgs",
    "ThrottleArgs",
    "VmInfo",
    "VmMode",
    "VmSpec",
]


class ControlCommand(StrEnum):
    """What the host daemon may ask of a VM process (its control socket)."""

    INFO = "info"
    CONFIGURE = "configure"  # a standby becomes the VM of vm.json in a directory
    ATTESTATION = "attestation"
    LAUNCH_RANGES = "launch_ranges"
    BIND = "bind"
    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    START_DIRTY_TRACKING = "start_dirty_tracking"
    HARVEST_DIRTY = "harvest_dirty"
    POPULATED_RANGES = "populated_ranges"
    CONSOLE = "console"
    CVMIO = "cvmio"
    THROTTLE = "throttle"
    STOP = "stop"
    REATTEST = "reattest"  # after the platform process was replaced: a fresh report from the restarted SP
    SCHEDULED_EVENTS = "scheduled_events"  # the blob is the VM's Scheduled Events document, for its cvm-io mailbox


class HardwareCommand(StrEnum):
    """What the secure processor asks of the hardware it exports from or imports into."""

    TAKE_DIRTY = "sp_take_dirty"
    HOLD_PAUSED = "sp_hold_paused"
    CAPTURE_STATE = "sp_capture_state"
    # The source's stop-and-copy on the hardware side in one round trip: pause, hold, capture, harvest.
    SWITCHOVER = "sp_switchover"
    RESTORE_STATE = "sp_restore_state"


class RelayCommand(StrEnum):
    """What a VM process asks of the host daemon: it carries SNP guest messages, as the real hypervisor does."""

    GUEST_REQUEST = "guest_request"
    EXT_CERTS = "ext_certs"
    EVENT = "event"
    # The guest posted to its Scheduled Events mailbox (its StartRequests, IMDS's body): the blob, as posted.
    SCHEDULED_EVENTS_POST = "scheduled_events_post"


class VmMode(StrEnum):
    LAUNCH = "launch"  # boots its image
    INCOMING = "incoming"  # waits for a migration


@dataclass(frozen=True, slots=True)
class VmSpec:
    """What the daemon asks for: written to ``vm.json`` in the VM's directory."""

    name: str
    memory: int
    vcpus: int = 1
    image: str = ""
    cmdline: str = ""
    backend: str | None = None
    mode: str = VmMode.LAUNCH.value
    attestation_url: str | None = None  # where the paravisor attests (None: no paravisor attestation)
    key_release_url: str | None = None  # optional relying party that releases the guest's data key
    key_name: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> VmSpec:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VmSpec:
        """The spec in ``data``; keys this spec does not have are refused (``TypeError`` names them)."""
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise TypeError(f"unknown VM spec keys: {', '.join(unknown)}")
        return cls(**data)


# -- requests -------------------------------------------------------------------------------------------


class ConfigureArgs(TypedDict):
    dir: str


class BindArgs(TypedDict):
    handle: int


class ConsoleArgs(TypedDict):
    since: int


class CvmioArgs(TypedDict):
    timeout: float


class ThrottleArgs(TypedDict):
    pct: int


class TakeDirtyArgs(TypedDict):
    fresh: bool


class RestoreStateArgs(TypedDict, total=False):
    handle: Required[int]
    vcpu_len: Required[int]  # the blob is vCPU state then device state
    run: bool  # run the guest once restored (the SP's activation and first run in one command)


class GuestRequestArgs(TypedDict):
    handle: int


class EventArgs(TypedDict):
    type: str
    data: dict[str, Any]
    vm: str


class ScheduledEventsPostArgs(TypedDict):
    vm: str


# -- answers --------------------------------------------------------------------------------------------


class VmInfo(TypedDict):
    name: str
    pid: int
    mode: str
    state: str
    handle: int | None
    memory: int
    vcpus: int
    backend: str | None
    image: str
    stop_reason: str | None
    console_lines: int
    throttle: int


class AttestationInfo(TypedDict, total=False):
    """The paravisor's current token and what it says (empty: none yet)."""

    token: str
    jti: str
    chip_id: str
    tcb: str
    platform: str
    issued_at: float
    reason: str
    data_key: str | None


class Resumed(TypedDict):
    pause_ms: float | None  # vCPUs stopped to running again (monotonic clock), when this process saw both
    resumed_at: float  # Unix time the vCPUs were released (QEMU's RESUME event, as the guest lives it)


@dataclass(frozen=True, slots=True)
class Resumption:
    """What ``VmProcess.resume`` did: ``paused`` seconds stopped (when known), ``at`` the Unix time the vCPUs ran;
    ``then``, when set, is for the caller to run once it has answered (the paravisor's re-attestation)."""

    paused: float | None
    at: float
    then: Callable[[], None] | None = None


class Reattested(TypedDict):
    reattested: bool  # False: this VM has no paravisor attestation configured
    jti: str | None


class ConsolePage(TypedDict):
    lines: list[str]
    next: int


class LaunchRanges(TypedDict):
    ranges: list[list[int]]


class PopulatedRanges(TypedDict):
    ranges: list[list[int]]
