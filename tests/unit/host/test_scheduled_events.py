"""host.scheduled_events: the per-VM document store — incarnations never go back, approvals name listed events."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from cvmotion.errors import Conflict, UsageError
from cvmotion.host.scheduled_events import (
    ScheduledEventsDocument,
    ScheduledEventsStore,
    StartRequests,
)


def _event(event_id: str = "e1", status: str = "Scheduled", **over: Any) -> dict[str, Any]:
    event = {
        "EventId": event_id,
        "EventType": "Freeze",
        "ResourceType": "VirtualMachine",
        "Resources": ["vm1"],
        "EventStatus": status,
        "NotBefore": "Fri, 04 Dec 2026 19:00:00 GMT" if status == "Scheduled" else "",
        "Description": "host update",
        "EventSource": "Platform",
        "DurationInSeconds": 5,
    }
    event.update(over)
    return event


def _doc(incarnation: int, *events: dict[str, Any]) -> ScheduledEventsDocument:
    return ScheduledEventsDocument.model_validate({"DocumentIncarnation": incarnation, "Events": list(events)})


def _approve(*ids: str) -> StartRequests:
    return StartRequests.model_validate({"StartRequests": [{"EventId": i} for i in ids]})


@pytest.fixture
def store(tmp_path: Path) -> ScheduledEventsStore:
    return ScheduledEventsStore(tmp_path / "se")


def test_unknown_vm_has_an_empty_document(store: ScheduledEventsStore) -> None:
    record = store.record("vm1")
    assert record.document.DocumentIncarnation == 0
    assert record.document.Events == []
    assert record.startRequests == []


def test_incarnation_never_goes_back(store: ScheduledEventsStore) -> None:
    store.put("vm1", _doc(2, _event()))
    with pytest.raises(Conflict):
        store.put("vm1", _doc(1))  # a delayed PUT would resurrect what the guest saw end
    assert store.document("vm1").DocumentIncarnation == 2
    store.put("vm1", _doc(2, _event(), _event("e2")))  # the same incarnation again: a retried PUT
    store.put("vm1", _doc(3))
    assert store.document("vm1").Events == []


def test_approvals_name_listed_events_and_follow_the_document(store: ScheduledEventsStore) -> None:
    store.put("vm1", _doc(1, _event("e1"), _event("e2")))
    with pytest.raises(UsageError, match="no scheduled event 'nope'"):
        store.approve("vm1", _approve("nope"))
    assert store.approve("vm1", _approve("e1", "e1")) == ["e1"]
    assert store.approve("vm1", _approve("e2", "e1")) == ["e1", "e2"]
    store.put("vm1", _doc(2, _event("e2", "Started")))
    assert store.record("vm1").startRequests == ["e2"]  # e1 left the document, its approval with it
    store.put("vm1", _doc(3))
    assert store.record("vm1").startRequests == []


def test_persisted_atomically_and_read_back_by_a_new_store(store: ScheduledEventsStore, tmp_path: Path) -> None:
    store.put("vm1", _doc(7, _event()))
    store.approve("vm1", _approve("e1"))
    again = ScheduledEventsStore(tmp_path / "se")
    assert again.record("vm1") == store.record("vm1")
    assert [p.name for p in (tmp_path / "se").iterdir() if not p.name.startswith(".")] == ["vm1.json"]
    store.forget("vm1")
    assert again.document("vm1").DocumentIncarnation == 0


def test_guest_bytes_are_the_imds_document(store: ScheduledEventsStore) -> None:
    store.put("vm1", _doc(4, _event()))
    doc = json.loads(store.guest_bytes("vm1"))
    assert doc == {"DocumentIncarnation": 4, "Events": [_event()]}
    assert list(doc["Events"][0]) == list(_event())  # IMDS's key order


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("EventType", "Delete"),
        ("EventStatus", "Completed"),
        ("NotBefore", "2026-12-04T19:00:00Z"),
        ("EventId", 'e"1'),
        ("EventId", ""),
        ("DurationInSeconds", "5"),
        ("DurationInSeconds", True),
        ("Resources", ["../x"]),
        ("EventSource", "User"),
        ("Extra", 1),
    ],
)
def test_malformed_documents_are_refused(field: str, value: object) -> None:
    event = _event()
    event[field] = value
    with pytest.raises(ValidationError):
        _doc(1, event)


def test_whole_floats_are_integers() -> None:
    body = {"DocumentIncarnation": 3.0, "Events": [_event(DurationInSeconds=5.0)]}
    doc = ScheduledEventsDocument.model_validate(body)
    assert doc.DocumentIncarnation == 3
    assert doc.Events[0].DurationInSeconds == 5
    with pytest.raises(ValidationError):
        _doc(3, _event(DurationInSeconds=5.5))


def test_bad_input_is_refused(store: ScheduledEventsStore) -> None:
    with pytest.raises(ValidationError):
        _doc(-1)
    with pytest.raises(ValidationError):
        StartRequests.model_validate({"StartRequests": []})
    with pytest.raises(UsageError):
        store.document("../etc")
    with pytest.raises(ValidationError):
        ScheduledEventsDocument.model_validate({"DocumentIncarnation": 1, "Events": [_event()] * 65})


def test_an_unreadable_record_is_a_clear_error(store: ScheduledEventsStore, tmp_path: Path) -> None:
    (tmp_path / "se").mkdir()
    (tmp_path / "se" / "vm1.json").write_text("{not json")
    with pytest.raises(UsageError, match="unreadable"):
        store.record("vm1")
