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


def test_the_host_api_model_is_built_from_the_one_schema() -> None:
    from cvmotion.host.api_schema import MigrateRequest
    from cvmotion.migration.options import OPTIONS

    properties = MigrateRequest.model_json_schema()["properties"]
    assert set(properties) == {"destination"} | {spec.api_name for spec in OPTIONS}
    assert properties["streams"] == {**OPTIONS[2].json_schema()}
    body = {"destination": "http://127.0.0.1:8082", "streams": 4, "io_timeout_s": 5.0}
    assert MigrateRequest.model_validate(body).options() == MigrationOptions(
        streams=4, io_timeout=5.0, setup_timeout=5.0
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"io_timeout": 5.0}, "unknown migration option"),  # the engine's name is not the API's
        ({"stream": 2}, "unknown migration option"),
        ({"streams": 17}, "streams"),
        ({"auto_converge": "yes"}, "expected bool"),
        ({"throttle_initial": 50, "throttle_max": 40}, "throttle"),
    ],
    ids=lambda v: str(v)[:30],
)
def test_the_host_api_refuses_what_the_schema_refuses(body: dict[str, Any], message: str) -> None:
    from pydantic import ValidationError

    from cvmotion.host.api_schema import MigrateRequest

    with pytest.raises(ValidationError, match=message):
        MigrateRequest.model_validate({"destination": "http://127.0.0.1:8082", **body})


def test_an_option_that_follows_another_takes_its_value_only_when_omitted() -> None:
    assert MigrationOptions.from_api({"io_timeout_s": 3.0}).setup_timeout == 3.0
    assert MigrationOptions.from_api({"io_timeout_s": 3.0, "setup_timeout_s": 9.0}).setup_timeout == 9.0
    assert MigrationOptions.from_api({}) == MigrationOptions()


def test_the_cli_has_one_flag_per_option_and_sends_only_what_was_given() -> None:
    import argparse

    from cvmotion.cli.migrate import add_option_flags, options_from_args
    from cvmotion.migration.options import OPTIONS

    parser = argparse.ArgumentParser()
    add_option_flags(parser)
    flags = {flag for action in parser._actions for flag in action.option_strings} - {"-h", "--help"}
    assert {spec.cli_flag for spec in OPTIONS} <= flags
    args = parser.parse_args(["--streams", "4", "--no-auto-converge", "--io-timeout", "5"])
    assert options_from_args(args) == {"streams": 4, "auto_converge": False, "io_timeout_s": 5.0}
    assert options_from_args(parser.parse_args([])) == {}
    with pytest.raises(UsageError, match="streams"):
        options_from_args(parser.parse_args(["--streams", "99"]))


def test_an_excluded_minimum_is_excluded_everywhere() -> None:
    """The downtime limit must be positive, however small (tests force rounds with 0.01 ms)."""
    from cvmotion.migration.options import OPTIONS

    assert MigrationOptions(downtime_limit_ms=0.01).downtime_limit_ms == 0.01
    with pytest.raises(UsageError, match="more than 0"):
        MigrationOptions(downtime_limit_ms=0)
    assert OPTIONS[0].json_schema()["exclusiveMinimum"] == 0
