"""A standby VM process whose daemon is already gone when its interpreter starts exits on its own (it is told the
daemon's PID; reading its parent at start-up would find PID 1 and wait for ever)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)


def test_a_standby_of_a_daemon_that_died_before_it_started_exits(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a daemon that is already gone: its PID is no process's parent any more
    cmd = [sys.executable, "-m", "cvmotion.vmd", "--standby", "--dir", str(tmp_path)]
    cmd += ["--platform", str(tmp_path / "platform.sock"), "--parent", str(gone.pid)]
    standby = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert standby.wait(timeout=30) == 0
    finally:
        if standby.poll() is None:
            standby.kill()
            standby.wait()
    assert not (tmp_path / "control.sock").exists()
