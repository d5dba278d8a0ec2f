"""host layer: each VM's Scheduled Events document (Azure IMDS's shape) and the guest's early approvals.

The controller publishes a VM's document here (``PUT /v1/vms/{name}/scheduledevents``); the guest reads it
through its host, over HTTP (``/v1/vms/{name}/metadata/scheduledevents``, like IMDS's
``/metadata/scheduledevents``) or through its cvm-io mailbox, and may approve an event early by posting
``{"StartRequests": [{"EventId": ...}]}``; the controller reads the approvals back with the document.

Rules (Azure Scheduled Events):

- ``DocumentIncarnation`` never goes back: a document older than the stored one is refused (``Conflict``),
  so a delayed or replayed PUT cannot resurrect an event the guest has seen end.  The same incarnation again
  replaces the document (a retried PUT).
- An approval names an event of the current document (else ``UsageError``: the guest asked for something
  that is not scheduled).  Approvals of events that a newer document no longer lists are dropped with them.

Persisted as ``<root>/<vm>.json`` (``{"document": ..., "startRequests": [...]}``), written atomically with
fsync (``cvmotion.files``), so a restarted daemon answers the same document and approvals.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from cvmotion.errors import Conflict, UsageError
from cvmotion.files import write_json
from cvmotion.ipc.names import NAME_PATTERN, check_name

__all__ = [
    "EVENT_ID_PATTERN",
    "NOT_BEFORE_PATTERN",
    "ScheduledEvent",
    "ScheduledEventsDocument",
    "ScheduledEventsRecord",
    "ScheduledEventsStore",
    "StartRequest",
    "StartRequests",
]

# An EventId travels into the guest's JSON parser and into file names of nothing: letters, digits, '.', '_',
# ':' and '-' (a GUID fits), never a quote or a backslash.
EVENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
# RFC 1123 (IMDS's NotBefore: "Mon, 19 Sep 2016 18:29:47 GMT"), or empty once the event has started.
NOT_BEFORE_PATTERN = (
    r"^$|^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), [0-3][0-9] (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
    r"[0-9]{4} [0-2][0-9]:[0-5][0-9]:[0-6][0-9] GMT$"
)
MAX_EVENTS = 64
_STRICT = ConfigDict(extra="forbid", strict=True)
_ID = Annotated[str, Field(pattern=EVENT_ID_PATTERN)]


def _whole(value: object) -> object:
    """JSON Schema's integer includes 7.0: a whole float is that integer; anything else is left to the check."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


_Whole = Annotated[int, BeforeValidator(_whole)]


class ScheduledEvent(BaseModel):
    """One event, field for field as IMDS's Scheduled Events (api-version 2020-07-01) has it."""

    model_config = _STRICT

    EventId: _ID
    EventType: Literal["Freeze", "Reboot", "Redeploy"]
    ResourceType: Literal["VirtualMachine"]
    Resources: list[Annotated[str, Field(pattern=NAME_PATTERN)]] = Field(max_length=MAX_EVENTS)
    EventStatus: Literal["Scheduled", "Started"]
    NotBefore: str = Field(pattern=NOT_BEFORE_PATTERN, description="RFC 1123 date, or empty once Started")
    Description: str = Field(max_length=1024)
    EventSource: Literal["Platform"]
    DurationInSeconds: _Whole = Field(ge=-1, le=7 * 86400, description="expected impact; -1 when unknown")


class ScheduledEventsDocument(BaseModel):
    """A VM's document: what the guest reads."""

    model_config = _STRICT

    # At most 2**53 - 1: exact in every JSON parser (IEEE doubles), so a schema check and ours never disagree.
    DocumentIncarnation: _Whole = Field(ge=0, le=2**53 - 1)
    Events: list[ScheduledEvent] = Field(max_length=MAX_EVENTS)


class StartRequest(BaseModel):
    model_config = _STRICT

    EventId: _ID


class StartRequests(BaseModel):
    """The guest's early approval (IMDS: ``POST /metadata/scheduledevents``)."""

    model_config = _STRICT

    StartRequests: list[StartRequest] = Field(min_length=1, max_length=MAX_EVENTS)


class ScheduledEventsRecord(BaseModel):
    """What the controller reads back: the document and the approvals of events it still lists."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    document: ScheduledEventsDocument
    startRequests: list[str]


_EMPTY = ScheduledEventsDocument(DocumentIncarnation=0, Events=[])


class ScheduledEventsStore:
    """The documents of this host's VMs, one file per VM under ``root``. Thread-safe."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._lock = threading.Lock()

    def _path(self, vm: str) -> Path:
        return self._root / f"{check_name('VM name', vm)}.json"

    def _load(self, vm: str) -> ScheduledEventsRecord:
        try:
            raw = self._path(vm).read_text()
        except FileNotFoundError:
            return ScheduledEventsRecord(document=_EMPTY, startRequests=[])
        try:
            return ScheduledEventsRecord.model_validate(json.loads(raw))
        except (ValueError, ValidationError) as exc:
            raise UsageError(f"scheduled events of {vm!r}: the stored record is unreadable ({exc})") from exc

    def _save(self, vm: str, record: ScheduledEventsRecord) -> None:
        write_json(self._path(vm), record.model_dump(mode="json"))

    def record(self, vm: str) -> ScheduledEventsRecord:
        with self._lock:
            return self._load(vm)

    def document(self, vm: str) -> ScheduledEventsDocument:
        return self.record(vm).document

    def put(self, vm: str, document: ScheduledEventsDocument) -> ScheduledEventsDocument:
        """Store ``document`` unless it is older than the stored one (``Conflict``: never roll back)."""
        with self._lock:
            current = self._load(vm)
            stored = current.document.DocumentIncarnation
            if document.DocumentIncarnation < stored:
                raise Conflict(f"DocumentIncarnation {document.DocumentIncarnation} is older than the stored {stored}")
            listed = {event.EventId for event in document.Events}
            kept = [event_id for event_id in current.startRequests if event_id in listed]
            self._save(vm, ScheduledEventsRecord(document=document, startRequests=kept))
            return document

    def approve(self, vm: str, requests: StartRequests) -> list[str]:
        """Record the guest's early approvals; every EventId must be in the current document."""
        with self._lock:
            current = self._load(vm)
            listed = {event.EventId for event in current.document.Events}
            wanted = [r.EventId for r in requests.StartRequests]
            unknown = [event_id for event_id in wanted if event_id not in listed]
            if unknown:
                raise UsageError(f"no scheduled event {', '.join(map(repr, unknown))} for VM {vm!r}")
            approved = list(current.startRequests)
            approved += [event_id for event_id in dict.fromkeys(wanted) if event_id not in approved]
            self._save(vm, ScheduledEventsRecord(document=current.document, startRequests=approved))
            return approved

    def guest_bytes(self, vm: str) -> bytes:
        """The document as the guest reads it from its mailbox: compact JSON, IMDS's key order."""
        return self.document(vm).model_dump_json().encode()

    def forget(self, vm: str) -> None:
        """The VM left this host (deleted, or migrated away): its document goes with it."""
        with self._lock:
            self._path(vm).unlink(missing_ok=True)
