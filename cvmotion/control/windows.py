"""control layer: scheduled maintenance windows (Azure's maintenance configurations, scope Host).

A window names hosts, a start, a duration and a reason.  When it opens, the leader's sweep drains its hosts
one after another, in the order given (a host's VMs need the others as destinations), each drain started
only once the previous one ended; a window that closes before every host's drain could start ends
``Expired`` and leaves the rest alone (a drain already running finishes).  Each step is one transaction of
the sweep, so a controller restarted mid-window picks the window up where its rows say it is.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from cvmotion.control.db import Event, Host
from cvmotion.control.db_maintenance import Drain, MaintenanceWindow
from cvmotion.control.drains import DEFAULT_MAX_PARALLEL, active_drain, host_subject, start_drain
from cvmotion.control.drainstates import ACTIVE_DRAIN, DrainReason, WindowStatus
from cvmotion.control.resources import no_bool
from cvmotion.errors import Conflict, NotFound
from cvmotion.ipc.names import NAME_PATTERN

__all__ = ["WindowRequest", "create_window", "delete_window", "open_windows", "parse_duration", "window_view"]

_DURATION = re.compile(r"^P?T?(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?$", re.IGNORECASE)
_HHMM = re.compile(r"^(\d{1,3}):([0-5]\d)$")
# What the request schema states (a client generated from it sends only these shapes); the range is checked after.
_DURATION_FORMS = r"PT\d{1,3}H(\d{1,5}M)?|PT\d{1,5}M|PT\d{1,6}S|\d{1,3}h(\d{1,5}m)?|\d{1,5}m|\d{1,6}s|\d{1,3}:[0-5]\d"
_DURATION_PATTERN = rf"^({_DURATION_FORMS})$"
_ISO_TIME = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:\d{2})?"
_START_PATTERN = rf"^(now|\+({_DURATION_FORMS})|{_ISO_TIME})$"


def parse_duration(text: str) -> float:
    """Seconds of ``PT2H30M`` (ISO 8601, as Azure's windows), ``2h30m``, ``90s`` or ``02:30`` (Azure's HH:mm)."""
    value = text.strip()
    hhmm = _HHMM.match(value)
    if hhmm:
        return int(hhmm.group(1)) * 3600.0 + int(hhmm.group(2)) * 60.0
    match = _DURATION.match(value)
    if not value or match is None or not any(match.groups()):
        raise ValueError(f"duration {text!r}: expected PT2H, 2h30m, 90s or HH:MM")
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return hours * 3600.0 + minutes * 60.0 + seconds


def _parse_start(text: str) -> float:
    if text == "now":
        return time.time()
    if text.startswith("+"):
        return time.time() + parse_duration(text[1:])
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"start {text!r}: expected an ISO 8601 time (2026-12-04T22:00Z), 'now' or +DURATION") from None
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()


class WindowRequest(BaseModel):
    """``PUT /providers/Cvmotion.Fabric/maintenanceWindows/{name}``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    hosts: list[Annotated[str, Field(pattern=NAME_PATTERN)]] = Field(min_length=1, max_length=1000)
    start: str = Field(
        max_length=64, pattern=_START_PATTERN, description="ISO 8601 time (UTC when no offset), 'now' or +DURATION"
    )
    duration: str = Field(
        max_length=32, pattern=_DURATION_PATTERN, description="PT2H, 2h30m, 90m, 90s or HH:MM; 1 min to 7 days"
    )
    reason: Literal["SecurityUpdate", "HardwareRefresh"]
    max_parallel: Annotated[int, Field(ge=1, le=64), BeforeValidator(no_bool)] = Field(
        default=DEFAULT_MAX_PARALLEL, alias="maxParallel"
    )
    notice_seconds: Annotated[float | None, Field(ge=0, le=7 * 86400), BeforeValidator(no_bool)] = Field(
        default=None, alias="noticeSeconds"
    )

    @field_validator("start")
    @classmethod
    def _start(cls, value: str) -> str:
        _parse_start(value)
        return value

    @field_validator("duration")
    @classmethod
    def _duration(cls, value: str) -> str:
        if not 60 <= parse_duration(value) <= 7 * 86400:
            raise ValueError(f"duration {value!r}: between one minute and seven days")
        return value

    @field_validator("hosts")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("a host is named twice")
        return value


def create_window(session: Session, name: str, body: WindowRequest, default_notice: float) -> MaintenanceWindow:
    if session.get(MaintenanceWindow, name) is not None:
        raise Conflict(f"maintenance window {name!r} exists (delete it first)")
    unknown = [h for h in body.hosts if session.get(Host, h) is None]
    if unknown:
        raise NotFound(f"hosts not registered: {', '.join(unknown)}")
    start = _parse_start(body.start)
    window = MaintenanceWindow(
        name=name,
        hosts=list(body.hosts),
        start=start,
        duration_s=parse_duration(body.duration),
        reason=DrainReason(body.reason),
        max_parallel=body.max_parallel,
        notice_s=default_notice if body.notice_seconds is None else body.notice_seconds,
        status=WindowStatus.SCHEDULED,
        drains=[],
        message="",
        created_at=time.time(),
        updated_at=time.time(),
    )
    session.add(window)
    data = {"window": name, "hosts": window.hosts, "reason": body.reason, "start": start}
    for host in window.hosts:
        when = data | {"host": host, "durationS": window.duration_s}
        session.add(Event(type="cvmotion.maintenance.scheduled", subject=host_subject(host), data=when))
    session.flush()
    return window


def delete_window(session: Session, name: str) -> dict[str, Any]:
    """``DELETE``: the window stops (no further host is drained) and its record goes; answers its last view.

    A drain it already started goes on (it is the host's, cancelled there) and keeps the window's name.
    The record goes rather than staying as Canceled: a deleted resource answers 404, and its name is free.
    """
    window = session.get(MaintenanceWindow, name, with_for_update=True)
    if window is None:
        raise NotFound(f"maintenance window {name!r} does not exist")
    if window.status in (WindowStatus.SCHEDULED, WindowStatus.RUNNING):
        window.status, window.updated_at = WindowStatus.CANCELED, time.time()
        window.message = "deleted; a drain already running goes on (cancel it on its host)"
    view = window_view(window)
    session.delete(window)
    return view


def _step(session: Session, window: MaintenanceWindow, now: float) -> None:
    end = window.start + window.duration_s
    if window.status is WindowStatus.SCHEDULED:
        if now >= end:
            window.status, window.message = WindowStatus.EXPIRED, "the controller did not run while it was open"
            return
        window.status = WindowStatus.RUNNING
    if window.drains:
        last = session.get(Drain, window.drains[-1])
        if last is not None and last.status in ACTIVE_DRAIN:
            return  # one host at a time
    if len(window.drains) >= len(window.hosts):
        window.status = WindowStatus.COMPLETED
        return
    if now >= end:
        left = window.hosts[len(window.drains) :]
        window.status, window.message = WindowStatus.EXPIRED, f"closed before draining {', '.join(left)}"
        return
    host = window.hosts[len(window.drains)]
    if active_drain(session, host) is not None:
        return  # an operator's drain of that host runs: the window's starts after it
    try:
        drain = start_drain(
            session, host, window.reason, max_parallel=window.max_parallel, notice_s=window.notice_s, window=window.name
        )
    except NotFound:
        window.drains, window.message = [*window.drains, ""], f"host {host} is no longer registered; skipped"
        return
    window.drains = [*window.drains, drain.id]


def open_windows(session: Session, now: float | None = None) -> int:
    """Advance every open window by one step (the leader's sweep); how many windows it looked at."""
    now = time.time() if now is None else now
    query = select(MaintenanceWindow).where(
        MaintenanceWindow.status.in_((WindowStatus.SCHEDULED, WindowStatus.RUNNING)), MaintenanceWindow.start <= now
    )
    windows = list(session.scalars(query.with_for_update()))
    for window in windows:
        _step(session, window, now)
        window.updated_at = now
    return len(windows)


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")


def window_view(window: MaintenanceWindow) -> dict[str, Any]:
    return {
        "id": f"/providers/Cvmotion.Fabric/maintenanceWindows/{window.name}",
        "name": window.name,
        "hosts": window.hosts,
        "start": _iso(window.start),
        "end": _iso(window.start + window.duration_s),
        "durationSeconds": window.duration_s,
        "reason": window.reason.value,
        "maxParallel": window.max_parallel,
        "noticeSeconds": window.notice_s,
        "status": window.status.value,
        "drains": [d for d in window.drains if d],
        "message": window.message or None,
    }
