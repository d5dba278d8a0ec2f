"""host layer: handing a host over to its next daemon and platform processes (the memory-preserving update).

A successor is started *before* the VMs pause, so the interpreter start and the imports (seconds on a loaded
two-core host) are paid while the guests still run; inside the pause it only takes over.  Each successor
gets one end of a socketpair and speaks three bytes on it::

    successor ──"R"──► predecessor      loaded, waiting (the newest installed code: a fresh interpreter)
    successor ◄──"G"── predecessor      go: the predecessor has let go of what the successor takes over
    successor ──"S"──► predecessor      serving (the platform process: its socket is bound)

The daemon's successor runs ``sys.orig_argv`` again (the same arguments) and inherits the listening sockets
of the host API and the migration listener (``pass_fds``), so the ports stay the same and a connection made
during the hand-over waits in the backlog instead of being refused.  The platform's successor is
``python -m cvmotion.platformd ... --succeed FD --predecessor PID``: it opens the sealed secure-processor
state once the predecessor has exited (``firmware.sp_seal``).
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cvmotion.errors import UsageError

__all__ = ["ENV", "Handoff", "Successor", "pid_gone", "spawn_daemon_successor", "spawn_process_successor"]

ENV = "CVMOTION_SUCCESSION"
READY, GO, SERVING = b"R", b"G", b"S"


def pid_gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie waiting for its parent counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X")


def wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not pid_gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def _expect(sock: socket.socket, want: bytes, timeout: float, what: str) -> None:
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise UsageError(f"{what}: no answer within {timeout:.0f} s")
    got = sock.recv(1)
    if got != want:
        raise UsageError(f"{what}: {'it exited' if not got else f'unexpected {got!r}'}")


@dataclass
class Successor:
    """A successor process being prepared, seen from its predecessor."""

    what: str
    proc: subprocess.Popen[bytes]
    control: socket.socket

    def wait_ready(self, timeout: float) -> None:
        _expect(self.control, READY, timeout, f"the {self.what} successor")

    def go(self) -> None:
        self.control.sendall(GO)

    def wait_serving(self, timeout: float) -> None:
        _expect(self.control, SERVING, timeout, f"the {self.what} successor")

    def abandon(self) -> None:
        """Stop a successor that will not be needed (the update failed before it took over)."""
        self.control.close()
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def release(self) -> None:
        self.control.close()


def spawn_process_successor(what: str, cmd: list[str], log: Path) -> Successor:
    """Start ``cmd + ["--succeed", FD]`` in its own session (it outlives this process)."""
    mine, theirs = socket.socketpair()
    try:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [*cmd, "--succeed", str(theirs.fileno())],
                stdout=out,
                stderr=out,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,
            )
    finally:
        theirs.close()
    return Successor(what, proc, mine)


def spawn_daemon_successor(http: socket.socket, migration: socket.socket, maintenance_id: str, log: Path) -> Successor:
    """Start this daemon again (same interpreter, same arguments), inheriting its two listening sockets."""
    mine, theirs = socket.socketpair()
    fds = (theirs.fileno(), http.fileno(), migration.fileno())
    env = dict(os.environ)
    env[ENV] = json.dumps(
        {
            "control": fds[0],
            "http": fds[1],
            "migration": fds[2],
            "maintenance": maintenance_id,
            "predecessor": os.getpid(),
        }
    )
    try:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, *sys.orig_argv[1:]],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                pass_fds=fds,
                env=env,
                start_new_session=True,
            )
    finally:
        theirs.close()
    return Successor("daemon", proc, mine)


@dataclass
class Handoff:
    """Inside a successor daemon: its predecessor's sockets and the hand-over conversation."""

    control: socket.socket
    http_fd: int
    migration_fd: int
    maintenance_id: str
    predecessor: int

    @classmethod
    def from_environment(cls) -> Handoff | None:
        raw = os.environ.pop(ENV, None)
        if not raw:
            return None
        try:
            doc = json.loads(raw)
            return cls(
                socket.socket(fileno=int(doc["control"])),
                int(doc["http"]),
                int(doc["migration"]),
                str(doc["maintenance"]),
                int(doc["predecessor"]),
            )
        except (ValueError, KeyError, TypeError, OSError) as exc:
            raise UsageError(f"${ENV} is not a hand-over this process can take: {exc}") from exc

    def http_socket(self) -> socket.socket:
        return socket.socket(fileno=self.http_fd)

    def migration_socket(self) -> socket.socket:
        return socket.socket(fileno=self.migration_fd)

    def take_over(self, timeout: float) -> None:
        """Say ready, wait for go, then for the predecessor to be gone (it stops accepting before it exits)."""
        self.control.sendall(READY)
        _expect(self.control, GO, timeout, "the predecessor daemon")
        self.control.close()
        if not wait_pid_gone(self.predecessor, timeout):
            raise UsageError(f"the predecessor daemon (pid {self.predecessor}) did not exit")
