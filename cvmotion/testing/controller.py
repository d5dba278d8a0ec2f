"""testing: a real ``cvmotion controller serve`` process on a fixed loopback port, killable and restartable.

The port is picked once, so a restarted controller answers at the same URL (hosts and clients keep it).
Every wait is bounded; ``kill()`` defaults to SIGKILL (a crash).
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from cvmotion.errors import UsageError
from cvmotion.testing.hosts import free_port

__all__ = ["ControllerProcess"]


@dataclass
class ControllerProcess:
    data_dir: Path
    db: str | None = None
    heartbeat_timeout: float = 3600.0
    lease: float = 1.0
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def owner_token(self) -> str:
        return (self.data_dir / "owner.token").read_text().strip()

    def start(self, timeout: float = 60.0) -> ControllerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "cvmotion", "controller", "serve", "--listen", f"127.0.0.1:{self.port}"]
        cmd += ["--data-dir", str(self.data_dir), "--heartbeat-timeout", str(self.heartbeat_timeout)]
        cmd += ["--lease", str(self.lease)]
        if self.db:
            cmd += ["--db", self.db]
        err = (self.data_dir / f"serve-{self.starts}.err").open("ab")
        env = dict(os.environ, CVMOTION_HOME=str(self.data_dir / "home"), **self.env)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
        err.close()
        self.starts += 1
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            ready = sel.select(timeout)
        line = self.proc.stdout.readline().decode(errors="replace") if ready else ""
        if not line.startswith("cvmotion controller: "):
            self.kill()
            tail = (self.data_dir / f"serve-{self.starts - 1}.err").read_text(errors="replace")[-2000:]
            raise UsageError(f"the controller did not start: {line!r} {tail}")
        return self

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 20.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.wait_exit(timeout)

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait (bounded) for the process to end; its return code (-9 after a SIGKILL)."""
        if self.proc is None:
            raise UsageError("the controller was never started")
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise UsageError(f"the controller did not exit within {timeout:.0f} s") from None
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code

    def api(self, method: str, path: str, body: Any = None, *, token: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token or self.owner_token}"}
        return httpx.request(method, self.url + path, json=body, headers=headers, timeout=60)

    def wait_operation(self, location: str, timeout: float = 60.0) -> dict[str, Any]:
        # A path, or a URL (possibly another replica's: every replica answers for every operation).
        path = "/" + location.split("://", 1)[1].split("/", 1)[1] if "://" in location else location
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            op: dict[str, Any] = self.api("GET", path).json()
            if op.get("status") in ("Succeeded", "Failed"):
                return op
            time.sleep(0.05)
        raise UsageError(f"operation {location} did not settle within {timeout:.0f} s")
