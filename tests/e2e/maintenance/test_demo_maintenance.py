"""``cvmotion demo maintenance --json`` end to end: every check of the demo holds and its report is complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_demo_maintenance(tmp_path: Path) -> None:
    env = dict(os.environ, CVMOTION_HOME=str(tmp_path / "home"))
    done = subprocess.run(
        [sys.executable, "-m", "cvmotion", "demo", "maintenance", "--json", "--workdir", str(tmp_path / "demo")],
        env=env, capture_output=True, text=True, timeout=540,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    report = json.loads(done.stdout)
    assert report["ok"], report["checks"]
    vms = {v["name"]: v for v in report["vms"]}
    assert (vms["kv"]["method"], vms["dirty"]["method"], vms["pinned"]["to"]) == (
        "LiveMigration", "MemoryPreservingUpdate", "host-2",
    )  # fmt: skip
    assert vms["dirty"]["pauseMs"] < 1000
    assert report["load"]["lost_writes"] == 0
    assert report["load"]["failed_requests"] == 0
    kinds = report["events"]["by_type"]
    assert report["events"]["source"] == "webhook"
    for kind in ("cvmotion.maintenance.scheduled", "cvmotion.maintenance.started", "cvmotion.maintenance.completed",
                 "cvmotion.migration.started", "cvmotion.migration.completed", "cvmotion.maintenance.fallback",
                 "cvmotion.vm.postMigrationAttestation"):  # fmt: skip
        assert kinds.get(kind, 0) >= 1, kind
