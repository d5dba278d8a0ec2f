"""``/metrics``: the fleet's Prometheus series, aggregated from the database at scrape time, behind a token
that reads every subscription."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from control_harness import Api
from prometheus_client.parser import text_string_to_metric_families
from test_events_stream import serving

from cvmotion.control.auth import Role
from cvmotion.control.db import Event
from cvmotion.control.service import FleetController


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    with serving(FleetController(tmp_path / "ctl", workers=1)) as a:
        yield a


def record(api: Api, type_: str, **data: Any) -> None:
    api.ctl.transaction(lambda s: s.add(Event(type=type_, subject="/hosts/h1", data=data)))


def scrape(api: Api, token: str | None = "owner") -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    response = api.req("GET", "/metrics", token=token)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_histograms_and_counters_from_the_events(api: Api) -> None:
    for total, downtime in ((800, 40), (2600, 120), (45_000, 310)):
        record(api, "cvmotion.migration.completed", vm="v", totalMs=total, downtimeMs=downtime, bytes=1 << 30)
    record(api, "cvmotion.migration.completed", vm="odd", totalMs="fast")  # not a number: left out
    record(api, "cvmotion.maintenance.fallback", vm="m", method="MemoryPreservingUpdate", pauseMs=180)
    for reason in ("DestinationUnreachable: h2 refused", "DestinationUnreachable", "PolicyDenied"):
        record(api, "cvmotion.migration.failed", vm="f", reason=reason)
    m = scrape(api)
    total = m["cvmotion_migration_duration_seconds_bucket"]
    assert total[(("le", "1.0"),)] == 1
    assert total[(("le", "5.0"),)] == 2
    assert total[(("le", "+Inf"),)] == 3
    assert m["cvmotion_migration_duration_seconds_count"][()] == 3
    assert m["cvmotion_migration_duration_seconds_sum"][()] == pytest.approx(48.4)
    downtime = m["cvmotion_migration_downtime_seconds_bucket"]
    assert downtime[(("le", "0.05"),)] == 1
    assert downtime[(("le", "0.3"),)] == 2
    assert downtime[(("le", "0.5"),)] == 3
    pause = m["cvmotion_maintenance_fallback_pause_seconds_bucket"]
    assert pause[(("le", "0.1"),)] == 0
    assert pause[(("le", "0.2"),)] == 1
    assert m["cvmotion_migrations_total"] == {(("outcome", "Succeeded"),): 4, (("outcome", "Failed"),): 3}
    assert m["cvmotion_migration_failures_total"] == {
        (("reason", "DestinationUnreachable"),): 2,
        (("reason", "PolicyDenied"),): 1,
    }
    assert m["cvmotion_maintenance_fallbacks_total"] == {(("method", "MemoryPreservingUpdate"),): 1}
    assert m["cvmotion_events_newest_id"][()] == 8
    assert m["cvmotion_webhook_deliveries"][(("state", "Pending"),)] == 0


def test_reason_labels_are_bounded(api: Api) -> None:
    for i in range(35):
        record(api, "cvmotion.migration.failed", vm="f", reason=f"reason-{i:02d}-" + "x" * 80 + ": detail")
    reasons = scrape(api)["cvmotion_migration_failures_total"]
    assert len(reasons) == 31
    assert reasons[(("reason", "other"),)] == 5
    assert all(len(dict(labels)["reason"]) <= 64 for labels in reasons)


def test_metrics_need_a_token_for_every_subscription(api: Api) -> None:
    assert api.req("GET", "/metrics", token=None).status_code == 401
    refused = api.req("GET", "/metrics", token=api.token(Role.READER, "alpha"))
    assert refused.status_code == 403
    assert "every subscription" in refused.json()["error"]["message"]
    assert api.req("GET", "/metrics", token=api.token(Role.HOST)).status_code == 403
    assert "cvmotion_migrations_total" in scrape(api, api.token(Role.READER))


def test_drains_in_progress_counts_the_unsettled(tmp_path: Path) -> None:
    from sqlalchemy.orm import Session

    from cvmotion.control.db import open_database
    from cvmotion.control.db_maintenance import Drain
    from cvmotion.control.drainstates import DrainReason, DrainStatus
    from cvmotion.control.metrics import collect_from

    engine = open_database(f"sqlite:///{tmp_path / 'c.db'}")
    with Session(engine) as s, s.begin():
        for i, status in enumerate((DrainStatus.RUNNING, DrainStatus.CANCELING, DrainStatus.SUCCEEDED)):
            s.add(Drain(id=f"d{i}", host=f"h{i}", reason=DrainReason.SECURITY_UPDATE, status=status,
                        max_parallel=2, notice_s=0.0))  # fmt: skip
    with Session(engine) as s:
        [gauge] = [m for m in collect_from(s) if m.name == "cvmotion_drains_in_progress"]
    engine.dispose()
    assert gauge.samples[0].value == 2
