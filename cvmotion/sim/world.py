"""sim layer: the running world — the fleet's HTTP server, its event thread and the hosts' heartbeats.

``World`` serves every simulated host on one loopback port, fires the fleet's events in virtual time,
registers each host with the controller through its real API (role Host) and heartbeats them, spread
evenly over the heartbeat interval, with the names of the VMs each host runs.  A host that is down sends
nothing.  Everything stops with ``close()``; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from types import TracebackType

import httpx
import uvicorn

from cvmotion.errors import CvmError
from cvmotion.ipc.http import listen_socket
from cvmotion.ipc.http_client import default_ssl_context
from cvmotion.sim.hostapi import create_app
from cvmotion.sim.hosts import SimFleet

__all__ = ["World"]

log = logging.getLogger("cvmotion.sim")
_REGISTER = "/providers/Cvmotion.Fabric/hosts/register"
_IN_FLIGHT = 32  # heartbeats awaiting an answer at once (the controller's API serves 40 requests at a time)
_BACKLOG = 512  # beyond this many unanswered heartbeats, new ones are skipped (and counted)


def _answered(busy: set[str], name: str, _task: asyncio.Task[None]) -> None:
    busy.discard(name)


class World:
    def __init__(self, fleet: SimFleet, controller_url: str, host_token: str, heartbeat_s: float) -> None:
        self.fleet = fleet
        self.controller_url = controller_url
        self.heartbeat_s = heartbeat_s
        self.heartbeats = 0
        self.heartbeats_skipped = 0
        self._stop = threading.Event()
        self._sock, self.url = listen_socket("127.0.0.1", 0)
        fleet.api_prefix = self.url
        config = uvicorn.Config(
            create_app(fleet), log_level="warning", lifespan="off", access_log=False, timeout_keep_alive=30
        )
        self._server = uvicorn.Server(config)
        self._client = httpx.Client(
            base_url=controller_url,
            headers={"Authorization": f"Bearer {host_token}"},
            timeout=30,
            verify=default_ssl_context(),
        )
        self._threads = [
            threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, name="sim-hosts", daemon=True),
            threading.Thread(target=fleet.scheduler.run, args=(self._stop,), name="sim-events", daemon=True),
        ]

    def __enter__(self) -> World:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def register_all(self) -> None:
        """Register every host (sequentially: one keep-alive connection, as many daemons would)."""
        for host in self.fleet.hosts.values():
            with self.fleet.lock:
                body = host.registration(self.fleet.url_of(host.name))
            response = self._client.post(_REGISTER, json=body)
            if response.status_code >= 300:
                raise CvmError(f"registering {host.name}: HTTP {response.status_code} {response.text[:300]}")

    def start_heartbeats(self) -> None:
        """Heartbeat every host from one asyncio loop, each on its own schedule, concurrently as daemons would."""
        thread = threading.Thread(target=lambda: asyncio.run(self._heartbeats()), name="sim-beats", daemon=True)
        thread.start()
        self._threads.append(thread)

    async def _heartbeats(self) -> None:
        names = list(self.fleet.hosts)
        gap = self.heartbeat_s / max(1, len(names))
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Task[None]] = set()
        busy: set[str] = set()  # hosts with a beat unanswered
        async with httpx.AsyncClient(
            base_url=self.controller_url,
            headers=self._client.headers,
            timeout=120,
            verify=default_ssl_context(),
            limits=httpx.Limits(max_connections=_IN_FLIGHT),
        ) as client:
            due, i = loop.time(), 0
            while not self._stop.is_set():
                due += gap
                while loop.time() < due and not self._stop.is_set():  # short naps: a stop is seen within 1 s
                    await asyncio.sleep(min(due - loop.time(), 1.0))
                name, i = names[i % len(names)], i + 1
                # A daemon sends one report at a time (the controller relies on it: a report is assembled
                # after the previous one was answered), so a host whose last beat is unanswered skips this one.
                if len(pending) >= _BACKLOG or name in busy:
                    self.heartbeats_skipped += 1
                    continue
                busy.add(name)
                task = asyncio.create_task(self._beat(client, name))
                pending.add(task)
                task.add_done_callback(pending.discard)
                task.add_done_callback(functools.partial(_answered, busy, name))
            for task in pending:
                task.cancel()

    async def _beat(self, client: httpx.AsyncClient, name: str) -> None:
        host = self.fleet.hosts[name]
        with self.fleet.lock:
            if host.down:
                return
            vms = host.running()
        try:
            response = await client.post(f"/providers/Cvmotion.Fabric/hosts/{name}/heartbeat", json={"vms": vms})
            if response.status_code == 404:  # the controller forgot the host: register again
                with self.fleet.lock:
                    body = host.registration(self.fleet.url_of(name))
                await client.post(_REGISTER, json=body)
            self.heartbeats += 1
        except httpx.HTTPError as exc:
            log.warning("heartbeat of %s failed: %s", name, exc)

    def close(self) -> None:
        self._stop.set()
        self._server.should_exit = True
        deadline = time.monotonic() + 15
        for thread in self._threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        self._client.close()
        self._sock.close()
