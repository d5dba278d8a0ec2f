"""``cvmotion webhook create|list|show|delete``: the CLI over the controller's webhook API (one JSON object
with --json, a clear one-line error and exit 1 for bad input)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from control_harness import Api
from test_events_stream import serving

from cvmotion.cli.main import main
from cvmotion.control.service import FleetController


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    with serving(FleetController(tmp_path / "ctl", workers=1)) as a:
        yield a


def cli(api: Api, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    code = main(["webhook", *argv, "--controller", str(api.client.base_url), "--token", api.owner, "--json"])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else None, err


def test_create_list_show_delete(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    code, made, _ = cli(api, capsys, "create", "--url", "http://127.0.0.1:9/in", "--types", "cvmotion.migration.*",
                        "cvmotion.vm.postMigrationAttestation", "--max-attempts", "3")  # fmt: skip
    assert code == 0
    assert made["types"] == ["cvmotion.migration.*", "cvmotion.vm.postMigrationAttestation"]
    assert made["secret"].startswith("whsec_")
    assert made["maxDeliveryAttempts"] == 3
    code, listed, _ = cli(api, capsys, "list")
    assert code == 0
    assert [h["id"] for h in listed["value"]] == [made["id"]]
    code, shown, _ = cli(api, capsys, "show", "--id", made["id"], "--deliveries", "--state", "DeadLettered")
    assert (code, shown) == (0, {"value": []})
    assert cli(api, capsys, "delete", "--id", made["id"])[:2] == (0, {"deleted": made["id"]})
    code, _, err = cli(api, capsys, "delete", "--id", made["id"])
    assert code == 1
    assert "does not exist" in err


def test_bad_input_is_one_clear_line(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(api, capsys, "create", "--url", "http://127.0.0.1:9/in", "--secret", "hunter2")
    assert code == 1
    assert "secret" in err
    assert "Traceback" not in err
    code, _, err = cli(api, capsys, "create", "--url", "not a url")
    assert code == 1
    assert "url" in err
