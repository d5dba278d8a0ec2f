"""control layer: who leads — a PostgreSQL advisory lock, or a file lock next to a SQLite database.

Every replica serves the API and works on operations (claims keep them apart); only the leader runs the
sweep (host availability, reconciliation).  PostgreSQL's session-level advisory lock is released by the
server when the leader's connection dies, so a replica killed with SIGKILL is replaced at the next try.
A SQLite database has exactly one controller: the file lock is taken at start or the start is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from cvmotion.errors import UsageError

__all__ = ["Leadership"]

# An arbitrary 64-bit key naming "the cvmotion controller leader" among a database's advisory locks.
_LOCK_KEY = 0x63766D6F74696F6E


class Leadership:
    def __init__(self, engine: Engine, data_dir: Path) -> None:
        self.engine = engine
        self.sqlite = engine.dialect.name == "sqlite"
        self._fd: int | None = None
        self._conn: Connection | None = None
        if self.sqlite:
            self._fd = os.open(data_dir / "controller.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._fd)
                raise UsageError(
                    f"another controller already serves the SQLite database in {data_dir}"
                    " (several replicas need PostgreSQL: --db postgresql://...)"
                ) from None

    def try_lead(self) -> bool:
        """Whether this replica leads now (PostgreSQL: tries to take the advisory lock if it does not)."""
        if self.sqlite:
            return True
        try:
            if self._conn is None or self._conn.closed:
                self._conn = self.engine.connect()
            held = self._conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": _LOCK_KEY - (1 << 63)}).scalar()
            self._conn.commit()
        except SQLAlchemyError:
            self.release()
            return False
        return bool(held)

    def release(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(SQLAlchemyError):
                self._conn.close()
            self._conn = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
