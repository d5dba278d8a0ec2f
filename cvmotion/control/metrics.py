"""control layer: Prometheus metrics of the fleet, computed from the database at every scrape.

A custom collector (``prometheus_client``) aggregates the events table and the webhook deliveries in SQL
when ``/metrics`` is scraped, so every replica answers the same figures and a restarted controller loses
none (counters are totals since the database was created).  Series::

    cvmotion_migration_duration_seconds          histogram  totalMs of cvmotion.migration.completed
    cvmotion_migration_downtime_seconds          histogram  downtimeMs of cvmotion.migration.completed
    cvmotion_maintenance_fallback_pause_seconds  histogram  pauseMs of cvmotion.maintenance.fallback
    cvmotion_migrations_total{outcome}           counter    Succeeded (completed events), Failed (failed events)
    cvmotion_migration_failures_total{reason}    counter    failed events by reason code (30 commonest, then "other")
    cvmotion_maintenance_fallbacks_total{method} counter    fallback events by method
    cvmotion_drains_in_progress                  gauge      drains Accepted, Running or Canceling
    cvmotion_webhook_deliveries{state}           gauge      Pending, Succeeded, DeadLettered
    cvmotion_events_newest_id                    gauge      the newest event id (a reader's lag: this - cursor)

A value that is missing or not a number in an event's data is left out of its histogram, never an error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import ColumnElement, Float, case, cast, func, select
from sqlalchemy.orm import Session

from cvmotion.control.db import DeliveryState, Event, WebhookDelivery
from cvmotion.control.db_maintenance import Drain
from cvmotion.control.drainstates import ACTIVE_DRAIN

__all__ = ["FleetCollector", "render_metrics"]

COMPLETED = "cvmotion.migration.completed"
FAILED = "cvmotion.migration.failed"
FALLBACK = "cvmotion.maintenance.fallback"
DURATION_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
PAUSE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
MAX_LABELS = 30
LABEL_CHARS = 64


def _number(session: Session, key: str) -> ColumnElement[Any]:
    """``data[key]`` as a float where it is a JSON number, else NULL (never a cast error)."""
    if session.get_bind().dialect.name == "postgresql":
        is_number = func.json_typeof(Event.data[key]) == "number"
        return case((is_number, Event.data[key].as_float()))
    path = f'$."{key}"'
    is_number = func.json_type(Event.data, path).in_(("integer", "real"))
    return case((is_number, cast(func.json_extract(Event.data, path), Float)))


def _histogram(
    session: Session, name: str, doc: str, event_type: str, key: str, buckets: Sequence[float]
) -> HistogramMetricFamily:
    ms = _number(session, key)
    columns = [func.count(ms), func.coalesce(func.sum(ms), 0.0)]
    columns += [func.coalesce(func.sum(case((ms <= b * 1000.0, 1), else_=0)), 0) for b in buckets]
    count, total, *cumulative = session.execute(select(*columns).where(Event.type == event_type)).one()
    points = [(repr(b), int(c)) for b, c in zip(buckets, cumulative, strict=True)] + [("+Inf", int(count))]
    return HistogramMetricFamily(name, doc, buckets=points, sum_value=float(total) / 1000.0)


def _by_label(session: Session, event_type: str, key: str) -> list[tuple[str, int]]:
    """Counts by ``data[key]``'s code: the text before a ':' (``"InPlaceFailed: host gone"`` counts as
    ``InPlaceFailed``), at most ``LABEL_CHARS``; the ``MAX_LABELS`` commonest, the rest as ``other``."""
    value = func.coalesce(Event.data[key].as_string(), "")
    rows = session.execute(select(value, func.count()).where(Event.type == event_type).group_by(value))
    codes: dict[str, int] = {}
    for label, count in rows:
        code = str(label).split(":", 1)[0].strip()[:LABEL_CHARS] or "unknown"
        codes[code] = codes.get(code, 0) + int(count)
    ranked = sorted(codes.items(), key=lambda item: (-item[1], item[0]))
    kept = dict(ranked[:MAX_LABELS])
    if len(ranked) > MAX_LABELS:
        kept["other"] = kept.get("other", 0) + sum(count for _, count in ranked[MAX_LABELS:])
    return sorted(kept.items())


def _drains_in_progress(session: Session) -> int:
    return int(session.scalar(select(func.count()).where(Drain.status.in_(ACTIVE_DRAIN))) or 0)


def collect_from(session: Session) -> list[Metric]:
    """Every series, read in one transaction."""
    out: list[Metric] = [
        _histogram(session, "cvmotion_migration_duration_seconds", "live migrations' total time",
                   COMPLETED, "totalMs", DURATION_BUCKETS),
        _histogram(session, "cvmotion_migration_downtime_seconds", "live migrations' downtime (blackout)",
                   COMPLETED, "downtimeMs", PAUSE_BUCKETS),
        _histogram(session, "cvmotion_maintenance_fallback_pause_seconds", "fallbacks' measured pause",
                   FALLBACK, "pauseMs", PAUSE_BUCKETS),
    ]  # fmt: skip
    outcomes = CounterMetricFamily("cvmotion_migrations", "migrations that ended, by outcome", labels=["outcome"])
    for outcome, event_type in (("Succeeded", COMPLETED), ("Failed", FAILED)):
        outcomes.add_metric([outcome], int(session.scalar(select(func.count()).where(Event.type == event_type)) or 0))
    reasons = CounterMetricFamily("cvmotion_migration_failures", "failed migrations by reason", labels=["reason"])
    for reason, count in _by_label(session, FAILED, "reason"):
        reasons.add_metric([reason], count)
    methods = CounterMetricFamily("cvmotion_maintenance_fallbacks", "fallbacks by method", labels=["method"])
    for method, count in _by_label(session, FALLBACK, "method"):
        methods.add_metric([method], count)
    out += [outcomes, reasons, methods]
    drains = _drains_in_progress(session)
    out.append(GaugeMetricFamily("cvmotion_drains_in_progress", "host drains not yet settled", value=drains))
    deliveries = GaugeMetricFamily("cvmotion_webhook_deliveries", "webhook deliveries by state", labels=["state"])
    rows = session.execute(select(WebhookDelivery.state, func.count()).group_by(WebhookDelivery.state))
    by_state = {state: int(count) for state, count in rows}
    for state in DeliveryState:
        deliveries.add_metric([state.value], by_state.get(state, 0))
    newest = int(session.scalar(select(func.max(Event.id))) or 0)
    out += [deliveries, GaugeMetricFamily("cvmotion_events_newest_id", "the newest event id", value=newest)]
    return out


class FleetCollector(Collector):
    """Reads the fleet's figures through ``read`` (one read-only transaction) at every scrape."""

    def __init__(self, read: Callable[[Callable[[Session], list[Metric]]], list[Metric]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        yield from self._read(collect_from)


def render_metrics(read: Callable[[Callable[[Session], list[Metric]]], list[Metric]]) -> bytes:
    """The text exposition format of every series (a registry per scrape: nothing global, nothing cached)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(read))
    return generate_latest(registry)
