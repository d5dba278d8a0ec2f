"""control layer: fleet events as CloudEvents 1.0 — rendering a row, filters, visibility, reading after a cursor.

An ``Event`` row (``control.db``) becomes one CloudEvents 1.0 JSON object (structured mode)::

    {"specversion": "1.0", "id": "<row id>", "source": "/cvmotion/controller", "type": ...,
     "subject": "<resource id>", "time": "2026-12-04T17:46:11.123Z",
     "datacontenttype": "application/json", "data": {...}}

``id`` is the row id: unique per database, stable, and increasing in commit order (``control.outbox``), so it
is also the cursor a reader resumes from.  ``type`` is the recorded type when it is a ``cvmotion.*`` name
(``cvmotion.migration.completed``, ...); the controller's own lifecycle types, recorded as bare PascalCase
names (``VmCreated``, ``OperationSucceeded``, ``HostUnavailable``, ...), render as ``Cvmotion.Fabric.<name>``
(the resource provider's namespace, as they always have).  Filters name rendered types.

Visibility follows the subject: an event about ``/subscriptions/{sub}/...`` is seen by a token for that
subscription or for every subscription (``*``); an event about anything else (a host, the fleet) by every
token allowed to read.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, false, func, not_, or_, select, true
from sqlalchemy.orm import Session

from cvmotion.control.db import Event

__all__ = [
    "LEGACY_PREFIX",
    "SOURCE",
    "EventFilter",
    "cloud_event",
    "cloud_type",
    "latest_events",
    "newest_id",
    "read_after",
]

SOURCE = "/cvmotion/controller"
LEGACY_PREFIX = "Cvmotion.Fabric."
NEW_PREFIX = "cvmotion."
# A type, or a prefix of types ending in ".*": cvmotion.migration.completed, cvmotion.migration.*, Cvmotion.Fabric.*
TYPE_PATTERN = r"^(\*|[A-Za-z][A-Za-z0-9]*(\.[A-Za-z][A-Za-z0-9]*)*(\.\*)?)$"
_SUBS = "/subscriptions/"


def cloud_type(recorded: str) -> str:
    """The CloudEvents ``type`` of a recorded type (see the module docstring)."""
    return recorded if recorded.startswith(NEW_PREFIX) else LEGACY_PREFIX + recorded


def rfc3339(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def cloud_event(row: Event) -> dict[str, Any]:
    """The CloudEvents 1.0 JSON object of one row (structured mode)."""
    return {
        "specversion": "1.0",
        "id": str(row.id),
        "source": SOURCE,
        "type": cloud_type(row.type),
        "subject": row.subject,
        "time": rfc3339(row.time),
        "datacontenttype": "application/json",
        "data": row.data,
    }


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _starts(text: str) -> ColumnElement[bool]:
    # Case-sensitive on both databases (SQLite's LIKE ignores ASCII case).
    return true() if not text else func.substr(Event.type, 1, len(text)) == text


def _type_condition(pattern: str) -> ColumnElement[bool]:
    """One rendered-type pattern as a condition on the recorded type (both namings)."""
    if pattern == "*":
        return true()
    prefix = pattern.endswith(".*")
    text = pattern[:-1] if prefix else pattern  # "cvmotion.migration." for a prefix
    branches: list[ColumnElement[bool]] = []
    # cvmotion.* types are recorded as rendered.
    if text.startswith(NEW_PREFIX) or NEW_PREFIX.startswith(text):
        branches.append(_starts(text) if prefix else Event.type == text)
    # Legacy types are recorded without the provider prefix.
    legacy_rest: str | None = None
    if text.startswith(LEGACY_PREFIX):
        legacy_rest = text[len(LEGACY_PREFIX) :]
    elif prefix and LEGACY_PREFIX.startswith(text):
        legacy_rest = ""
    if legacy_rest is not None:
        recorded = not_(_starts(NEW_PREFIX))
        branches.append(and_(recorded, _starts(legacy_rest) if prefix else Event.type == legacy_rest))
    return or_(*branches) if branches else false()


def _scope_condition(scope: str) -> ColumnElement[bool]:
    if scope == "*":
        return true()
    mine = func.lower(Event.subject).like(_SUBS + _like_escape(scope.lower()) + "/%", escape="\\")
    return or_(not_(func.lower(Event.subject).like(_SUBS + "%")), mine)


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which events a reader gets: type patterns (none: all), a subject prefix, and the reader's scope."""

    types: tuple[str, ...] = ()
    subject: str = ""  # a prefix of the subject, compared case-insensitively (ARM ids are)
    scope: str = "*"  # the subscription whose events (and the fleet's) are visible; "*" for all

    def conditions(self) -> list[ColumnElement[bool]]:
        out = [_scope_condition(self.scope)]
        if self.types:
            out.append(or_(*(_type_condition(p) for p in self.types)))
        if self.subject:
            out.append(func.lower(Event.subject).like(_like_escape(self.subject.lower()) + "%", escape="\\"))
        return out


def newest_id(session: Session) -> int:
    return int(session.scalar(select(func.max(Event.id))) or 0)


def read_after(session: Session, cursor: int, where: EventFilter, limit: int) -> tuple[list[Event], int]:
    """The events after ``cursor`` that ``where`` lets through (oldest first), and the new cursor.

    The newest id is read *first*: every id up to it is committed by then (ids are handed out in commit
    order), so the rows read next include all of them, and the cursor may move past the ones filtered out
    without looking at them again.
    """
    ceiling = newest_id(session)
    if ceiling <= cursor:
        return [], cursor
    rows = list(
        session.scalars(
            select(Event)
            .where(Event.id > cursor, Event.id <= ceiling, *where.conditions())
            .order_by(Event.id)
            .limit(limit)
        )
    )
    return rows, (rows[-1].id if len(rows) == limit else ceiling)


def latest_events(session: Session, where: EventFilter, limit: int) -> tuple[list[Event], int]:
    """The newest ``limit`` events ``where`` lets through (oldest first), and the cursor after them."""
    ceiling = newest_id(session)
    rows = list(
        session.scalars(
            select(Event).where(Event.id <= ceiling, *where.conditions()).order_by(Event.id.desc()).limit(limit)
        )
    )
    return rows[::-1], ceiling
