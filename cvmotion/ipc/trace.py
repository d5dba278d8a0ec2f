"""ipc: optional timing spans across a host's processes, to see where a switchover's milliseconds go.

Off unless ``CVMOTION_TRACE`` names a directory when the process starts: then every process of the host (daemon,
platform/SP, VM processes — they inherit the environment) appends one line per span to ``<dir>/<pid>.trace``::

    <start ns> <end ns> <process> <thread> <name>

with ``time.monotonic_ns()`` (CLOCK_MONOTONIC, one clock for every process on the host), so the spans of all
processes line up on one timeline (``bench/switchover_profile.py`` reads them).  Off, a span costs one attribute
test; nothing here carries guest data or keys, only names of calls and phases.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["ENABLED", "Span", "parse", "record", "span"]

_DIR = os.environ.get("CVMOTION_TRACE", "")
ENABLED = bool(_DIR)
_fd: int | None = None
_fd_lock = threading.Lock()


def _process_name() -> str:
    argv = sys.argv[1:4] if len(sys.argv) > 1 else sys.argv[:1]
    return "-".join(a for a in argv if a and not a.startswith("-"))[:40].replace(" ", "_") or "python"


_PROCESS = _process_name()  # sys.argv is set before any cvmotion module is imported


def _out() -> int:
    global _fd
    if _fd is None:
        with _fd_lock:
            if _fd is None:
                Path(_DIR).mkdir(parents=True, exist_ok=True)
                _fd = os.open(Path(_DIR) / f"{os.getpid()}.trace", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    return _fd


def record(name: str, start_ns: int, end_ns: int) -> None:
    """One span (a point when ``start_ns == end_ns``); one ``write`` per line, so lines never interleave."""
    if not ENABLED:
        return
    line = f"{start_ns} {end_ns} {_PROCESS} {threading.current_thread().name.replace(' ', '_')} {name}\n"
    os.write(_out(), line.encode())


_gc_started: dict[int, int] = {}


def _on_gc(phase: str, info: dict[str, int]) -> None:
    """A cyclic collection holds every thread of the process: it shows in the timeline as one span."""
    if phase == "start":
        _gc_started[threading.get_ident()] = time.monotonic_ns()
    else:
        started = _gc_started.pop(threading.get_ident(), None)
        if started is not None:
            record(
                f"gc generation {info.get('generation')} ({info.get('collected')} freed)", started, time.monotonic_ns()
            )


if ENABLED:
    gc.callbacks.append(_on_gc)


@contextmanager
def span(name: str) -> Iterator[None]:
    if not ENABLED:
        yield
        return
    start = time.monotonic_ns()
    try:
        yield
    finally:
        record(name, start, time.monotonic_ns())


class Span:
    """One parsed trace line."""

    __slots__ = ("end", "name", "pid", "process", "start", "thread")

    def __init__(self, pid: int, start: int, end: int, process: str, thread: str, name: str) -> None:
        self.pid, self.start, self.end = pid, start, end
        self.process, self.thread, self.name = process, thread, name


def parse(directory: Path) -> list[Span]:
    """Every span the processes wrote into ``directory``, ordered by start."""
    spans: list[Span] = []
    for path in directory.glob("*.trace"):
        pid = int(path.stem)
        for line in path.read_text().splitlines():
            parts = line.split(" ", 4)
            if len(parts) == 5:
                spans.append(Span(pid, int(parts[0]), int(parts[1]), parts[2], parts[3], parts[4]))
    spans.sort(key=lambda s: (s.start, s.end))
    return spans
