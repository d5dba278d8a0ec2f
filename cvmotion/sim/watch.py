"""sim layer: learning when controller operations end from its event stream, instead of polling each one.

One thread follows ``GET /providers/Cvmotion.Fabric/events?follow=true`` (Server-Sent Events) and records
every ``OperationSucceeded``/``OperationFailed`` it sees; ``wait`` blocks (bounded) until an operation's
end is known, and falls back to one ``GET`` of the operation when the stream said nothing in time.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import httpx

from cvmotion.ipc.http_client import default_ssl_context
from cvmotion.sim.populate import ControllerApi

__all__ = ["OperationWatch"]

log = logging.getLogger("cvmotion.sim")
_ENDS = {"Cvmotion.Fabric.OperationSucceeded": "Succeeded", "Cvmotion.Fabric.OperationFailed": "Failed"}


class OperationWatch:
    def __init__(self, api: ControllerApi) -> None:
        self.api = api
        self._cond = threading.Condition()
        self._ended: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="sim-events-follow", daemon=True)
        self.connected = threading.Event()

    def start(self) -> OperationWatch:
        self._thread.start()
        self.connected.wait(10)
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _follow(self) -> None:
        headers = {"Authorization": f"Bearer {self.api.token}"}
        while not self._stop.is_set():
            try:
                with (
                    httpx.Client(base_url=self.api.url, headers=headers, verify=default_ssl_context()) as client,
                    client.stream("GET", "/providers/Cvmotion.Fabric/events?follow=true&limit=1", timeout=None) as r,
                ):
                    if r.status_code != 200:
                        log.warning("no event stream (HTTP %d): polling operations instead", r.status_code)
                        return
                    self.connected.set()
                    for line in r.iter_lines():
                        if self._stop.is_set():
                            return
                        if line.startswith("data: "):
                            self._note(json.loads(line[6:]))
            except (httpx.HTTPError, ValueError) as exc:
                self.connected.clear()
                log.warning("event stream broke (%s); reconnecting", exc)
                self._stop.wait(1.0)

    def _note(self, event: dict[str, object]) -> None:
        status = _ENDS.get(str(event.get("type")))
        data = event.get("data")
        if status is None or not isinstance(data, dict) or "operation" not in data:
            return
        with self._cond:
            self._ended[str(data["operation"])] = status
            self._cond.notify_all()

    def wait(self, op_id: str, path: str, timeout: float) -> tuple[str, dict[str, object]]:
        """The operation's final status and its view; ``("Timeout", view)`` when it did not end in time."""
        deadline = time.monotonic() + timeout
        poll = 0.25
        while True:
            # With the stream, its word ends the wait (a GET every 30 s at most); without it, poll with backoff.
            limit = 30.0 if self.connected.is_set() else poll
            poll = min(2.0, poll * 2)
            with self._cond:
                self._cond.wait_for(
                    lambda: op_id in self._ended, timeout=min(limit, max(0.0, deadline - time.monotonic()))
                )
            view: dict[str, object] = self.api.ok("GET", path)
            status = str(view.get("status"))
            if status in ("Succeeded", "Failed"):
                return status, view
            if time.monotonic() >= deadline:
                return "Timeout", view
