"""control layer: long-running operations — their kinds, statuses, steps and the allowed transitions.

Every create, delete and migration is a durable row; the worker that holds its claim moves it one step
at a time and commits each step *before* it acts on a host, so a controller killed at any instant is
resumed by the next one from the last committed step (each step is idempotent against the host)::

    Create:   Accepted ─▶ Placed ─▶ HostRequested ─▶ Succeeded
    Delete:   Accepted ─▶ HostRequested ─▶ Succeeded
    Migrate:  Accepted ─▶ HostRequested ─▶ Migrating ─▶ Succeeded
                   └───────────┴─────────────┴──────────▶ Failed   (VM stays where its host says it is)

``status`` is what the client polls (``Azure-AsyncOperation``: InProgress, Succeeded, Failed).
"""

from __future__ import annotations

import enum

__all__ = ["NEXT_STEPS", "OperationKind", "OperationStatus", "Step", "status_of"]


class OperationKind(enum.Enum):
    CREATE = "Create"
    DELETE = "Delete"
    MIGRATE = "Migrate"


class Step(enum.Enum):
    ACCEPTED = "Accepted"
    PLACED = "Placed"  # a host is chosen and recorded; nothing asked of it yet
    HOST_REQUESTED = "HostRequested"  # the host was (or is about to be) asked; ask it what it did
    MIGRATING = "Migrating"  # the source host runs the migration; its id is recorded
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class OperationStatus(enum.Enum):
    IN_PROGRESS = "InProgress"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


NEXT_STEPS: dict[OperationKind, dict[Step, frozenset[Step]]] = {
    OperationKind.CREATE: {
        Step.ACCEPTED: frozenset({Step.PLACED, Step.FAILED}),
        Step.PLACED: frozenset({Step.HOST_REQUESTED, Step.FAILED}),
        Step.HOST_REQUESTED: frozenset({Step.SUCCEEDED, Step.FAILED}),
    },
    OperationKind.DELETE: {
        Step.ACCEPTED: frozenset({Step.HOST_REQUESTED, Step.SUCCEEDED, Step.FAILED}),
        Step.HOST_REQUESTED: frozenset({Step.SUCCEEDED, Step.FAILED}),
    },
    OperationKind.MIGRATE: {
        Step.ACCEPTED: frozenset({Step.HOST_REQUESTED, Step.FAILED}),
        Step.HOST_REQUESTED: frozenset({Step.MIGRATING, Step.SUCCEEDED, Step.FAILED}),
        Step.MIGRATING: frozenset({Step.SUCCEEDED, Step.FAILED}),
    },
}


def status_of(step: Step) -> OperationStatus:
    if step is Step.SUCCEEDED:
        return OperationStatus.SUCCEEDED
    if step is Step.FAILED:
        return OperationStatus.FAILED
    return OperationStatus.IN_PROGRESS
