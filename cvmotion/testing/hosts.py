"""testing: real host daemons on loopback for end-to-end tests (``cvmotion host serve`` as a subprocess).

A ``HostProcess`` is one host: its daemon (which starts the platform process: emulated AMD-SP + MA) and,
later, its VM processes.  Platform and VM processes outlive the daemon on purpose (a daemon crash must not
kill guests), so ``close()`` ends them by the pids their data directory records — processes this helper
caused to exist, checked against ``/proc/PID/cmdline`` so a recycled pid is never hit.

Ports are fixed at creation (picked free once) so a restarted daemon comes back at the same host API URL
and migration port: a source's recovery thread keeps asking the URL it persisted.  Every wait is bounded.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from cvmotion.errors import UsageError
from cvmotion.host.peers import PeerAuth

__all__ = ["ApiError", "HostProcess", "free_port", "pid_alive"]

_ANNOUNCE = "cvmotion host "


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (the daemon binds with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (a stopped VM process stays one until its parent reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


class ApiError(UsageError):
    """A host API call answered with an error status."""

    def __init__(self, status: int, body: Any, what: str) -> None:
        super().__init__(f"{what}: HTTP {status}: {str(body)[:400]}")
        self.status = status
        self.body = body


@dataclass
class HostProcess:
    """One host daemon and the processes it left in its data directory."""

    name: str
    data_dir: Path
    vendor_dir: Path
    pool_ca_dir: Path
    pool: str = "pool-a"
    advertise: str | None = None
    extra_args: tuple[str, ...] = ()  # more ``cvmotion host serve`` flags (e.g. --max-guest-memory)
    api_port: int = field(default_factory=free_port)
    migration_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    _drain: threading.Thread | None = None
    # Every HTTP answer this client got (bounded): tests look for canaries in what the host API hands out.
    responses: collections.deque[bytes] = field(default_factory=lambda: collections.deque(maxlen=4096))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    # -- life cycle ---------------------------------------------------------------------------------

    def start(self, timeout: float = 90.0) -> HostProcess:
        """Start the daemon and wait (bounded) for its announcement line: it prints it once it serves."""
        if self.proc is not None and self.proc.poll() is None:
            raise UsageError(f"host {self.name} is already running")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "cvmotion", "host", "serve", "--name", self.name]
        cmd += ["--listen", f"127.0.0.1:{self.api_port}", "--migration-port", str(self.migration_port)]
        cmd += ["--data-dir", str(self.data_dir), "--vendor-dir", str(self.vendor_dir)]
        cmd += ["--pool-ca-dir", str(self.pool_ca_dir), "--pool", self.pool]
        if self.advertise:
            cmd += ["--migration-advertise", self.advertise]
        cmd += self.extra_args
        log = (self.data_dir / f"daemon-{self.starts}.err").open("ab")
        env = dict(os.environ, CVMOTION_HOME=str(self.data_dir / "home"))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env)
        log.close()
        self.starts += 1
        line = self._first_line(timeout)
        if not line.startswith(_ANNOUNCE):
            self.kill()
            err = (self.data_dir / f"daemon-{self.starts - 1}.err").read_text(errors="replace")[-2000:]
            raise UsageError(f"host {self.name} did not start: {line!r} {err}")
        return self

    def _first_line(self, timeout: float) -> str:
        proc = self.proc
        assert proc is not None
        assert proc.stdout is not None
        out = proc.stdout
        with selectors.DefaultSelector() as sel:
            sel.register(out, selectors.EVENT_READ)
            if not sel.select(timeout):
                return ""
        line = out.readline().decode(errors="replace")
        # Keep draining: a daemon blocked on a full stdout pipe would look like a hang.
        self._drain = threading.Thread(target=lambda: [None for _ in iter(out.readline, b"")], daemon=True)
        self._drain.start()
        return line

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise UsageError(f"host {self.name} was never started")
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 20.0) -> None:
        """Signal the daemon (default SIGKILL: a crash) and reap it; its platform and VM processes live on."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if self._drain is not None:
            self._drain.join(timeout)  # EOF once the daemon is gone
            self._drain = None
        if proc.stdout is not None:
            proc.stdout.close()

    def restart(self, timeout: float = 90.0) -> HostProcess:
        self.kill()
        return self.start(timeout)

    def leftover_pids(self) -> list[int]:
        """Platform, VM and successor daemon processes of this data directory that are still alive."""
        pids = []
        pid_files = [*self.data_dir.glob("vms/*/pid"), *self.data_dir.glob("standby/*/pid")]
        # daemon.pid: a successor daemon an update in place started (``host.maintenance``) outlives ``self.proc``.
        for path in [self.data_dir / "daemon.pid", self.data_dir / "platform.pid", *pid_files]:
            with contextlib.suppress(OSError, ValueError):
                pid = int(path.read_text().strip())
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                if str(self.data_dir) in cmdline and pid_alive(pid):
                    pids.append(pid)
        return pids

    def close(self, timeout: float = 20.0) -> None:
        """Stop the daemon, then the processes it left behind (VMs first, then the platform)."""
        self.kill(signal.SIGTERM, timeout)
        pids = self.leftover_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for pid in pids:
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    # -- the host API -------------------------------------------------------------------------------

    def api(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        timeout: float = 120.0,
        signed_by: HostProcess | None = None,
    ) -> Any:
        """``method path`` on the host API; the JSON answer, or ``ApiError`` for an error status.

        ``signed_by``: a host-to-host call, signed with that host's pool-issued credential (``host.peers``).
        """
        content = b"" if body is None else json.dumps(body).encode()
        headers = {"content-type": "application/json"} if body is not None else {}
        if signed_by is not None:
            headers |= PeerAuth.load(signed_by.data_dir).sign(method, path, content)
        response = httpx.request(method, f"{self.url}{path}", content=content, headers=headers, timeout=timeout)
        self.responses.append(response.content)
        try:
            data = response.json()
        except ValueError:
            data = response.text
        if response.status_code >= 300:
            raise ApiError(response.status_code, data, f"{self.name} {method} {path}")
        return data

    def vms(self) -> dict[str, dict[str, Any]]:
        return {str(v["name"]): v for v in self.api("GET", "/v1/vms")["vms"]}

    def vm_pid(self, name: str) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            pid = int((self.data_dir / "vms" / name / "pid").read_text().strip())
            if pid_alive(pid):
                return pid
        return None

    def platform_pid(self) -> int:
        return int((self.data_dir / "platform.pid").read_text().strip())

    def vm_dir(self, name: str) -> Path:
        return self.data_dir / "vms" / name
