"""sim layer: the real fleet controller in its own process, counted (``python -m cvmotion.sim.controller``).

It is ``cvmotion controller serve`` — the same ``FleetController`` (database, Alembic schema, workers,
leader sweep) and the same ``control.api`` app under uvicorn — with three things added for measuring:
SQLAlchemy event listeners that count every statement and commit of every engine in the process, an extra
read-only route ``GET /_sim/counters`` that returns them, and a Host-role token written next to the Owner
token for the simulated hosts.  Its own process so that its CPU time is its own (``/proc/PID/stat``).

``--shared-tls``: httpx builds a verifying TLS context (37 ms of CPU here) for every top-level
``httpx.request``, which the controller's host client makes per host call even for plain HTTP; with the
flag the process builds it once (what ``ipc.http_client.default_ssl_context`` does for the other clients).
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from cvmotion.errors import CvmError, UsageError

__all__ = ["ControllerCounters", "SimController"]

_READY_PREFIX = "cvmotion controller: "


@dataclass(frozen=True, slots=True)
class ControllerCounters:
    statements: int
    commits: int
    cpu_s: float


def _count_database(counts: dict[str, int]) -> None:
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    lock = threading.Lock()

    def bump(key: str) -> None:
        with lock:
            counts[key] += 1

    event.listen(Engine, "before_cursor_execute", lambda *_a, **_k: bump("statements"))
    event.listen(Engine, "commit", lambda *_a, **_k: bump("commits"))


def _share_tls_context() -> None:
    import httpx._transports.default as transport

    from cvmotion.ipc.http_client import default_ssl_context

    original = transport.create_ssl_context  # type: ignore[attr-defined]

    def cached(verify: Any = True, cert: Any = None, trust_env: bool = True) -> Any:
        if verify is True and cert is None:
            return default_ssl_context()
        return original(verify=verify, cert=cert, trust_env=trust_env)

    transport.create_ssl_context = cached  # type: ignore[attr-defined]


def serve(argv: list[str]) -> int:
    import logging

    import uvicorn

    from cvmotion.control.api import create_app
    from cvmotion.control.auth import ALL_SUBSCRIPTIONS, Role, issue_token
    from cvmotion.control.service import FleetController
    from cvmotion.files import PRIVATE, write_atomic
    from cvmotion.ipc.http import listen_socket, uvicorn_config

    parser = argparse.ArgumentParser(prog="python -m cvmotion.sim.controller")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--db")
    parser.add_argument("--heartbeat-timeout", type=float, required=True)
    parser.add_argument("--sweep-period", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--shared-tls", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(filename=str(args.data_dir / "controller.log"), level=logging.WARNING)
    counts = {"statements": 0, "commits": 0}
    _count_database(counts)
    if args.shared_tls:
        _share_tls_context()
    try:
        ctl = FleetController(
            args.data_dir,
            args.db,
            heartbeat_timeout=args.heartbeat_timeout,
            workers=args.workers,
            sweep_period=args.sweep_period,
        )
    except CvmError as exc:  # the database unreachable, a URL it cannot use: one line for the parent to show
        print(f"{exc}", file=sys.stderr)
        return 1
    sock, url = listen_socket("127.0.0.1", 0)
    ctl.start()
    with ctl.session() as session:
        host_token = issue_token(session, Role.HOST, ALL_SUBSCRIPTIONS)
    write_atomic(args.data_dir / "host.token", (host_token + "\n").encode(), mode=PRIVATE)
    app = create_app(ctl)

    def counters() -> dict[str, Any]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return dict(counts, cpu_s=usage.ru_utime + usage.ru_stime)

    app.add_api_route("/_sim/counters", counters, methods=["GET"], include_in_schema=False)
    print(f"{_READY_PREFIX}{url} ({ctl.dialect})", flush=True)
    server = uvicorn.Server(uvicorn_config(app))
    _exit_with_parent(server)
    try:
        server.run(sockets=[sock])
    finally:
        ctl.stop()
    return 0


def _exit_with_parent(server: Any) -> None:
    """Stop serving when the simulator that started this process is gone (killed: no one else stops us)."""
    parent = os.getppid()

    def watch() -> None:
        while not server.should_exit:
            if os.getppid() != parent:
                server.should_exit = True
                return
            time.sleep(1.0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


@dataclass
class SimController:
    """The parent's handle: start (bounded), counters, stop."""

    data_dir: Path
    db: str | None
    heartbeat_timeout: float
    sweep_period: float
    shared_tls: bool
    workers: int = 8
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    dialect: str = ""
    _client: httpx.Client | None = field(default=None, repr=False)

    def start(self, timeout: float = 120.0) -> SimController:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "cvmotion.sim.controller", "--data-dir", str(self.data_dir)]
        cmd += ["--heartbeat-timeout", str(self.heartbeat_timeout), "--sweep-period", str(self.sweep_period)]
        cmd += ["--workers", str(self.workers)]
        if self.db:
            cmd += ["--db", self.db]
        if self.shared_tls:
            cmd.append("--shared-tls")
        err_path = self.data_dir / "controller.err"
        with err_path.open("ab") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=dict(os.environ))
        line = _read_line(self.proc, timeout)
        if not line.startswith(_READY_PREFIX):
            self.stop()
            tail = err_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise UsageError(f"the controller did not start: {tail[0][:500]}")
        self.url, _, rest = line[len(_READY_PREFIX) :].partition(" ")
        self.dialect = rest.strip("()\n ")
        return self

    @property
    def owner_token(self) -> str:
        return (self.data_dir / "owner.token").read_text().strip()

    @property
    def host_token(self) -> str:
        return (self.data_dir / "host.token").read_text().strip()

    def counters(self) -> ControllerCounters:
        if self._client is None:
            self._client = httpx.Client(base_url=self.url, timeout=30)
        data = self._client.get("/_sim/counters").json()
        return ControllerCounters(int(data["statements"]), int(data["commits"]), float(data["cpu_s"]))

    def stop(self, timeout: float = 20.0) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    import selectors

    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if sel.select(min(1.0, max(0.0, deadline - time.monotonic()))):
                return proc.stdout.readline().decode(errors="replace")
            if proc.poll() is not None:
                return ""
    return ""


if __name__ == "__main__":
    raise SystemExit(serve(sys.argv[1:]))
