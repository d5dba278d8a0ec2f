"""control layer: host drains — reasons, statuses, the ladder's methods and each VM's steps with their transitions.

A drain cordons one host and walks every VM on it down a ladder, one durable step at a time (each step
commits before the host is asked anything, exactly like an operation)::

    Pending ─▶ LiveScheduled ─▶ LiveMigrating ─┬──────────────────────────────────────────▶ Done
       │            │               │ (retry: one more destination)                     ▲
       │            ▼               ▼                                                   │
       ├──────▶ InPlaceWaiting ─▶ InPlaceScheduled ─▶ InPlaceRunning ──────────────────▶│  (SecurityUpdate)
       └──────▶ RedeployScheduled ─▶ RedeployStopping ─▶ RedeployStarting ──────────────▶│  (HardwareRefresh)
                                                                     Blocked / Canceled ─┘

``Live*``: a confidential live migration (a Migrate operation the worker carries out).  ``InPlace*``: the
memory-preserving update of the whole host (one ``POST /v1/host/maintenance``), once no live move from
it is in flight.  ``Redeploy*``: stop on the source, confirmed, then a fresh start on another allowed host.
"""

from __future__ import annotations

import enum

__all__ = [
    "ACTIVE_DRAIN",
    "NEXT_VM_STEPS",
    "DrainMethod",
    "DrainReason",
    "DrainStatus",
    "VmOutcome",
    "VmStep",
    "WindowStatus",
]


class DrainReason(enum.Enum):
    SECURITY_UPDATE = "SecurityUpdate"  # the host's software is replaced: a VM may stay, paused in place
    HARDWARE_REFRESH = "HardwareRefresh"  # the host goes away: every VM must leave (live, or redeployed)


class DrainStatus(enum.Enum):
    ACCEPTED = "Accepted"
    RUNNING = "Running"
    CANCELING = "Canceling"  # no new step starts; steps in flight finish
    SUCCEEDED = "Succeeded"
    PARTIALLY_SUCCEEDED = "PartiallySucceeded"
    FAILED = "Failed"
    CANCELED = "Canceled"


ACTIVE_DRAIN = (DrainStatus.ACCEPTED, DrainStatus.RUNNING, DrainStatus.CANCELING)


class DrainMethod(enum.Enum):
    LIVE_MIGRATION = "LiveMigration"
    MEMORY_PRESERVING_UPDATE = "MemoryPreservingUpdate"
    REDEPLOY = "Redeploy"
    NONE = "None"


class VmOutcome(enum.Enum):
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    BLOCKED = "Blocked"  # the VM stays on the host; the reason says why (policy, no destination, canceled)


class VmStep(enum.Enum):
    PENDING = "Pending"  # its turn has not come (concurrency limits, the VM still settling)
    LIVE_SCHEDULED = "LiveScheduled"  # Freeze is Scheduled in its document; waits for NotBefore or approval
    LIVE_MIGRATING = "LiveMigrating"  # a Migrate operation is recorded; the worker carries it out
    IN_PLACE_WAITING = "InPlaceWaiting"  # waits until no live move from the host is in flight
    IN_PLACE_SCHEDULED = "InPlaceScheduled"  # Freeze is Scheduled; waits for NotBefore or approval
    IN_PLACE_RUNNING = "InPlaceRunning"  # the host's memory-preserving update was (or is about to be) asked
    REDEPLOY_SCHEDULED = "RedeployScheduled"  # Redeploy is Scheduled; waits for NotBefore or approval
    REDEPLOY_STOPPING = "RedeployStopping"  # the source was (or is about to be) told to stop the VM
    REDEPLOY_STARTING = "RedeployStarting"  # the destination was (or is about to be) told to start it
    DONE = "Done"


_FALLBACKS = frozenset({VmStep.IN_PLACE_WAITING, VmStep.REDEPLOY_SCHEDULED, VmStep.DONE})
NEXT_VM_STEPS: dict[VmStep, frozenset[VmStep]] = {
    VmStep.PENDING: frozenset({VmStep.LIVE_SCHEDULED}) | _FALLBACKS,
    VmStep.LIVE_SCHEDULED: frozenset({VmStep.LIVE_MIGRATING}) | _FALLBACKS,
    VmStep.LIVE_MIGRATING: frozenset({VmStep.LIVE_MIGRATING}) | _FALLBACKS,  # itself: the retry
    VmStep.IN_PLACE_WAITING: frozenset({VmStep.IN_PLACE_SCHEDULED, VmStep.DONE}),
    VmStep.IN_PLACE_SCHEDULED: frozenset({VmStep.IN_PLACE_RUNNING, VmStep.DONE}),
    VmStep.IN_PLACE_RUNNING: frozenset({VmStep.DONE}),
    VmStep.REDEPLOY_SCHEDULED: frozenset({VmStep.REDEPLOY_STOPPING, VmStep.DONE}),
    VmStep.REDEPLOY_STOPPING: frozenset({VmStep.REDEPLOY_STARTING, VmStep.DONE}),
    VmStep.REDEPLOY_STARTING: frozenset({VmStep.DONE}),
    VmStep.DONE: frozenset(),
}


class WindowStatus(enum.Enum):
    SCHEDULED = "Scheduled"  # not open yet
    RUNNING = "Running"  # open: its hosts are drained one after another
    COMPLETED = "Completed"  # every host was drained (whatever each drain's outcome)
    EXPIRED = "Expired"  # it closed before every host's drain could start; the rest were left alone
    CANCELED = "Canceled"
