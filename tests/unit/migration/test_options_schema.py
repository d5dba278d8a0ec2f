"""``MigrationOptions`` is the one schema of a migration's knobs: what another host sends is checked, not dropped."""

from __future__ import annotations

from typing import Any

import pytest

from cvmotion.errors import UsageError
from cvmotion.migration.options import MAX_TIMEOUT, MigrationOptions


def test_round_trip() -> None:
    options = MigrationOptions(downtime_limit_ms=50.0, streams=4, io_timeout=5.0)
    assert MigrationOptions.from_json(options.to_json()) == options


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"no_such_option": 1}, "unknown migration option"),
        ({"streams": "2"}, "expected int"),
        ({"streams": 2.5}, "expected int"),
        ({"auto_converge": 1}, "expected bool"),
        ({"io_timeout": True}, "expected float"),
        ({"io_timeout": MAX_TIMEOUT * 10}, "io timeout"),
        ({"commit_timeout": 0}, "commit timeout"),
        ({"streams": 99}, "streams"),
        ({"throttle_increment": 0}, "throttle"),
        ([], "JSON object"),
    ],
    ids=lambda v: str(v)[:30],
)
def test_bad_options_are_refused_with_the_reason(data: Any, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        MigrationOptions.from_json(data)
