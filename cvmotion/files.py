"""Small persistence helpers shared by every layer (atomic writes, private files, a directory lock).

The vendor directory, a host's data directory and the token service's key directory may be opened by
several processes at once (two host daemons starting together, a KDS and a ``cvmotion platform create``,
forked attestation workers). Files are written to a temporary
name and renamed, so a reader never sees half a key; secrets are created 0600 from the start (never
chmod-ed after the fact, which would leave a window); lazy creation happens under an ``flock``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cvmotion.errors import UsageError

__all__ = ["dir_lock", "read_json", "write_atomic", "write_json"]

PRIVATE = 0o600
PUBLIC = 0o644


def write_atomic(path: Path, data: bytes, *, mode: int = PUBLIC) -> None:
    """Write ``data`` to ``path`` atomically with permissions ``mode`` (0600 for secrets)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: Path, value: dict[str, Any], *, mode: int = PUBLIC) -> None:
    write_atomic(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode(), mode=mode)


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON object, turning a missing or corrupt file into a ``UsageError`` that names it."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{what}: {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{what}: cannot read {path}: {exc}") from exc
    if not isinstance(value, dict):
        raise UsageError(f"{what}: {path} does not hold a JSON object")
    return value


@contextlib.contextmanager
def dir_lock(directory: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``directory/.lock`` (serialises lazy creation across processes)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, PRIVATE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
