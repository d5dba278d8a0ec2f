"""control layer: each VM's Scheduled Events document (Azure IMDS's shape) — written, published, approved.

The drain writes a VM's document before each step (``Freeze`` for a live migration or an in-place pause,
``Redeploy``), moves the event ``Scheduled`` → ``Started`` (``NotBefore`` emptied) → removed, and bumps
``DocumentIncarnation`` at every change.  The document is kept in the database (so a restarted controller
publishes the same incarnations) and published to the VM's host (``PUT /v1/vms/{name}/scheduledevents``),
after the change commits; publishing never blocks a step (a guest's notice is advisory, its host may be
down).  A host that holds a newer incarnation (409) makes the controller jump past it.

An event may start before ``NotBefore`` when it is approved: by the VM's owner through the controller's API,
or by the guest through its host (``startRequests``, read back while the event waits).
"""

from __future__ import annotations

import email.utils
import logging
import time
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cvmotion.control.db_maintenance import EventApproval, ScheduledEventsDoc
from cvmotion.control.errors import InvalidRequest
from cvmotion.control.hostclient import HostApi
from cvmotion.errors import Conflict, CvmError

__all__ = [
    "EVENT_ID_PATTERN", "approve", "approved", "document", "finish", "guest_approvals", "publish", "rfc1123",
    "schedule", "start", "unpublished",
]  # fmt: skip

log = logging.getLogger("cvmotion.control.scheduled_events")
# As the host's rule: an EventId travels into the guest's JSON parser (a GUID fits).
EVENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"


def rfc1123(at: float) -> str:
    """IMDS's ``NotBefore`` format: ``Mon, 19 Sep 2016 18:29:47 GMT``."""
    return email.utils.formatdate(at, usegmt=True)


def _doc(session: Session, vm_id: str, host: str | None, host_vm_name: str) -> ScheduledEventsDoc:
    row = session.get(ScheduledEventsDoc, vm_id, with_for_update=True)
    if row is None:
        row = ScheduledEventsDoc(vm_id=vm_id, host=host, host_vm_name=host_vm_name, incarnation=0, events=[])
        row.published = -1
        session.add(row)
    return row


def _changed(row: ScheduledEventsDoc, events: list[Any], host: str | None) -> None:
    row.events = events
    row.incarnation = (row.incarnation or 0) + 1
    if host is not None:
        row.host = host
    row.updated_at = time.time()


def schedule(
    session: Session,
    *,
    vm_id: str,
    host: str,
    host_vm_name: str,
    event_type: str,
    not_before: float,
    duration_s: int,
    description: str,
) -> str:
    """Add a ``Scheduled`` event to the VM's document; its EventId."""
    row = _doc(session, vm_id, host, host_vm_name)
    event_id = str(uuid.uuid4()).upper()  # IMDS's EventIds are GUIDs
    event = {
        "EventId": event_id,
        "EventType": event_type,
        "ResourceType": "VirtualMachine",
        "Resources": [host_vm_name],
        "EventStatus": "Scheduled",
        "NotBefore": rfc1123(not_before),
        "Description": description[:1024],
        "EventSource": "Platform",
        "DurationInSeconds": duration_s,
    }
    _changed(row, [*list(row.events or []), event], host)
    return event_id


def start(session: Session, vm_id: str, event_id: str) -> None:
    """The event's impact begins: ``Started`` with an empty ``NotBefore`` (a no-op if it is gone)."""
    row = session.get(ScheduledEventsDoc, vm_id, with_for_update=True)
    if row is None or not any(e["EventId"] == event_id for e in row.events):
        return
    events = [e | {"EventStatus": "Started", "NotBefore": ""} if e["EventId"] == event_id else e for e in row.events]
    if events != row.events:
        _changed(row, events, None)


def finish(session: Session, vm_id: str, event_id: str | None, host: str | None = None) -> None:
    """The event is over: removed from the document, which from now on is published to ``host`` if given."""
    row = session.get(ScheduledEventsDoc, vm_id, with_for_update=True)
    if row is None or event_id is None:
        return
    events = [e for e in row.events if e["EventId"] != event_id]
    if events != row.events or (host is not None and host != row.host):
        _changed(row, events, host)


def approved(session: Session, vm_id: str, event_id: str | None) -> bool:
    return event_id is not None and session.get(EventApproval, (vm_id, event_id)) is not None


def approve(session: Session, vm_id: str, event_ids: list[str], source: str) -> None:
    """Record early starts; each must name a ``Scheduled`` event of the VM's document.

    Raises:
        InvalidRequest: an EventId that is not scheduled for this VM.
    """
    row = session.get(ScheduledEventsDoc, vm_id)
    scheduled = {e["EventId"] for e in (row.events if row else []) if e["EventStatus"] == "Scheduled"}
    for event_id in event_ids:
        if event_id not in scheduled:
            raise InvalidRequest(f"EventId {event_id!r} is not a Scheduled event of this VM")
        if session.get(EventApproval, (vm_id, event_id)) is None:
            session.add(EventApproval(vm_id=vm_id, event_id=event_id, source=source, at=time.time()))


def document(session: Session, vm_id: str) -> dict[str, Any]:
    row = session.get(ScheduledEventsDoc, vm_id)
    if row is None:
        return {"DocumentIncarnation": 0, "Events": []}
    return {"DocumentIncarnation": row.incarnation, "Events": list(row.events)}


def guest_approvals(api: HostApi, host_vm_name: str) -> list[str]:
    """The EventIds the guest asked to start early (none when its host cannot say)."""
    try:
        answer = api.scheduled_events(host_vm_name)
    except CvmError:
        return []
    requests = answer.get("startRequests", []) if isinstance(answer, dict) else []
    return [str(r) for r in requests if isinstance(r, str)]


def unpublished(session: Session, vm_ids: list[str]) -> list[ScheduledEventsDoc]:
    query = select(ScheduledEventsDoc).where(
        ScheduledEventsDoc.vm_id.in_(vm_ids), ScheduledEventsDoc.published < ScheduledEventsDoc.incarnation
    )
    return list(session.scalars(query))


def publish(api: HostApi, row: ScheduledEventsDoc) -> tuple[str, int]:
    """PUT the document to its host.

    Returns:
        ``("stored", incarnation)`` when the host took it; ``("behind", host_incarnation)`` when the host holds
        a newer one (409: the caller jumps past it); ``("later", 0)`` when the host cannot take it now
        (unreachable, the VM not there, the endpoint not served).
    """
    doc = {"DocumentIncarnation": row.incarnation, "Events": list(row.events)}
    try:
        stored = api.put_scheduled_events(row.host_vm_name, doc)
    except Conflict:
        try:
            current = api.scheduled_events(row.host_vm_name).get("document", {})
        except CvmError:
            return ("later", 0)
        return ("behind", int(current.get("DocumentIncarnation", 0)))
    except CvmError as exc:
        log.info("scheduled events of %s not published to its host yet: %s", row.host_vm_name, exc)
        return ("later", 0)
    return ("stored", int(stored.get("DocumentIncarnation", row.incarnation)))
