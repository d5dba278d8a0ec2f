"""host layer: one warm VM process kept ready, so a new VM (launched or arriving by migration) does not wait
for an interpreter to start.

A VM process costs ~0.5 s of CPU before it can serve (interpreter, numpy, cryptography, the HTTP client) plus
a paravisor transfer key (an RSA key pair). A source waits for the destination's VM process before its
migration starts, so that time is the larger part of what an operator waits for. The daemon keeps one
``--standby`` process under ``DATA_DIR/standby/<id>/``; ``take`` moves its socket, pid file and log into the
VM's directory and hands it the VM (``configure``). A replacement is started only when the host is quiet
again (``refill`` after the VM runs), never during a migration: on a small host it would compete with the
switchover for the CPU.

A standby dies with its daemon: when the control connection closes before it was given a VM, it exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cvmotion.errors import CvmError
from cvmotion.vmd.client import VmClient

__all__ = ["Standby", "StandbyPool"]

log = logging.getLogger("cvmotion.host")

_MOVED_FILES = ("control.sock", "pid", "vm.log")


@dataclass
class Standby:
    proc: subprocess.Popen[bytes]
    dir: Path
    client: VmClient

    def alive(self) -> bool:
        return self.proc.poll() is None and not self.client.closed

    def kill(self) -> None:
        self.client.close()
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


class StandbyPool:
    """At most one warm VM process; thread-safe."""

    def __init__(
        self,
        root: Path,
        platform_socket: Callable[[], Path],
        handler: Callable[[Any], Any],
        *,
        enabled: bool = True,
        timeout: float = 60.0,
    ) -> None:
        self.root = root
        self._platform_socket = platform_socket
        self._handler = handler
        self.enabled = enabled
        self._timeout = timeout
        self._lock = threading.Condition()
        self._ready: Standby | None = None
        self._starting = False
        self._closed = False

    def clean(self) -> None:
        """Remove what a previous daemon left (its standby exited when that daemon's connection closed)."""
        shutil.rmtree(self.root, ignore_errors=True)

    def refill(self) -> None:
        """Start a standby in the background unless one is ready or starting."""
        with self._lock:
            if not self.enabled or self._closed or self._starting or self._ready is not None:
                return
            self._starting = True
        threading.Thread(target=self._start_one, name="vm-standby", daemon=True).start()

    def take(self, vm_dir: Path) -> VmClient | None:
        """The standby as the VM whose ``vm.json`` is in ``vm_dir``; None when none is ready (start one cold).

        Raises:
            CvmError: the VM process refused the VM (its error names why); the standby is gone.
        """
        with self._lock:
            # One already starting is ready sooner than a cold start begun now (and does not compete with it).
            self._lock.wait_for(lambda: not self._starting, timeout=self._timeout)
            standby, self._ready = self._ready, None
        if standby is None:
            return None
        if not standby.alive():
            standby.kill()
            return None
        for name in _MOVED_FILES:
            target = vm_dir / name
            if name == "vm.log" and target.exists():
                # Keep the log of an earlier VM process of this name (a VM that left and came back).
                os.replace(target, vm_dir / "vm.log.1")
            if name == "control.sock":
                os.replace(standby.dir / name, target)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.replace(standby.dir / name, target)
        shutil.rmtree(standby.dir, ignore_errors=True)
        try:
            standby.client.configure(vm_dir, timeout=self._timeout)
        except CvmError:
            standby.client.close()
            with contextlib.suppress(OSError):
                standby.proc.kill()
            raise
        return standby.client

    def close(self) -> None:
        with self._lock:
            self._closed = True
            standby, self._ready = self._ready, None
        if standby is not None:
            standby.kill()

    def _start_one(self) -> None:
        standby_dir = self.root / secrets.token_hex(4)
        try:
            standby = self._spawn(standby_dir)
        except (CvmError, OSError) as exc:
            log.warning("no standby VM process: %s", exc)
            shutil.rmtree(standby_dir, ignore_errors=True)
            standby = None
        with self._lock:
            self._starting = False
            self._lock.notify_all()
            if standby is not None and not self._closed:
                self._ready = standby
                return
        if standby is not None:
            standby.kill()

    def _spawn(self, standby_dir: Path) -> Standby:
        standby_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "cvmotion.vmd", "--standby", "--dir", str(standby_dir)]
        # The daemon's PID, not the one the child reads at start-up: a daemon gone before the child's interpreter
        # is up would otherwise leave it re-parented with nothing to notice, waiting for ever.
        cmd += ["--platform", str(self._platform_socket()), "--parent", str(os.getpid())]
        with (standby_dir / "vm.log").open("ab") as log_file:
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=log_file, start_new_session=True)
        sock = standby_dir / "control.sock"
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if sock.exists():
                with contextlib.suppress(OSError, CvmError):
                    client = VmClient.connect("standby", str(sock), self._handler)
                    return Standby(proc, standby_dir, client)
            time.sleep(0.05)
        proc.kill()
        proc.wait(5)
        raise CvmError(f"the standby VM process did not come up within {self._timeout:.0f} s (see {standby_dir})")
