"""host layer: the host's event log — every state change as a CloudEvents 1.0 JSON object.

Kept in memory (bounded) and appended to ``events.jsonl`` in the data directory; streamed to clients
over Server-Sent Events by the host API.  Subscribers get every event published after they subscribe.
"""

from __future__ import annotations

import json
import queue
import threading
import uuid
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["EventBus"]


class EventBus:
    def __init__(self, source: str, log_path: Path | None = None, history: int = 5000) -> None:
        self.source = source
        self._log_path = log_path
        self._lock = threading.Lock()
        self._history: deque[dict[str, Any]] = deque(maxlen=history)
        self._subscribers: list[queue.Queue[dict[str, Any]]] = []

    def publish(self, kind: str, data: dict[str, Any], subject: str | None = None) -> dict[str, Any]:
        event: dict[str, Any] = {
            "specversion": "1.0",
            "id": uuid.uuid4().hex,
            "source": self.source,
            "type": f"cvmotion.{kind}",
            "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "datacontenttype": "application/json",
            "data": data,
        }
        if subject:
            event["subject"] = subject
        with self._lock:
            self._history.append(event)
            subscribers = list(self._subscribers)
            if self._log_path is not None:
                with self._log_path.open("a") as f:
                    f.write(json.dumps(event) + "\n")
        for q in subscribers:
            q.put(event)
        return event

    def recent(self, limit: int = 100, kind: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            events = [e for e in self._history if kind is None or e["type"] == f"cvmotion.{kind}"]
        return events[-limit:]

    def subscribe(self) -> queue.Queue[dict[str, Any]]:
        q: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=10000)
        with self._lock:
            self._subscribers.append(q)
        return q

    def unsubscribe(self, q: queue.Queue[dict[str, Any]]) -> None:
        with self._lock:
            if q in self._subscribers:
                self._subscribers.remove(q)
