"""testing: a throwaway PostgreSQL server (Debian's ``postgresql`` binaries) in a temp dir on a free port.

``PostgresServer.find()`` returns ``None`` when ``initdb``/``pg_ctl`` are not installed, so tests can skip
cleanly.  As root (CI), the cluster is made and run as the ``postgres`` system user, because ``initdb``
refuses to run as root.  ``database()`` creates a fresh database per test for isolation.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from cvmotion.errors import UsageError
from cvmotion.testing.hosts import free_port

__all__ = ["PostgresServer"]


def _bin_dir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    return versions[-1].parent if versions else None


class PostgresServer:
    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="cvmotion-pg-"))
        self.data = self.root / "data"
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = "postgres"
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.started = False

    @classmethod
    def find(cls) -> PostgresServer | None:
        bin_dir = _bin_dir()
        if bin_dir is None or not (bin_dir / "initdb").exists():
            return None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                return None
        return cls(bin_dir)

    def _run(self, *args: str, timeout: float = 60.0) -> None:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False, cwd=self.root)
        if done.returncode != 0:
            raise UsageError(f"{args[0]} failed: {done.stderr.decode(errors='replace')[-1500:]}")

    def start(self) -> PostgresServer:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "cvmotion", "--no-sync", "-E", "UTF8")
        self.resume()
        return self

    def resume(self) -> None:
        """Start the server on its data directory and port (after ``start``, or again after ``halt``)."""
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "start")
        self.started = True

    def halt(self) -> None:
        """Stop the server as a crash does (``pg_ctl stop -m immediate``: connections cut, no checkpoint),
        keeping its data for ``resume``."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=30)
        self.started = False

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://cvmotion@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """A new, empty database; its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.started:
            with contextlib.suppress(UsageError, subprocess.TimeoutExpired):
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=30)
            self.started = False
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
