"""host layer: registering this host with the fleet controller and heartbeating (over its HTTP API).

The host announces its identity (name, chip id, product, reported TCB, pool, region/zone), its
advertised capacity and its API and migration addresses, then heartbeats with the host-side names of
the VMs it runs, so the controller can reconcile its records.  A controller that is down is retried
with backoff; one that forgot the host (404 on a heartbeat) gets a fresh registration.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import httpx

from cvmotion.host.daemon import HostDaemon

__all__ = ["Registration", "RegistrationConfig"]

log = logging.getLogger("cvmotion.host.registration")


@dataclass(frozen=True, slots=True)
class RegistrationConfig:
    controller_url: str
    token: str
    api_url: str  # where the controller reaches this host's API
    region: str = "local"
    zone: str = ""
    vcpus: int = 96
    memory_gib: int = 768
    interval: float = 1.0


class Registration:
    """A daemon thread: register, then heartbeat every ``interval`` until ``stop``."""

    def __init__(self, daemon: HostDaemon, config: RegistrationConfig) -> None:
        self.daemon = daemon
        self.config = config
        self.registered = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="controller-registration", daemon=True)

    def start(self) -> Registration:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(
            self.config.controller_url.rstrip("/") + path,
            json=body,
            headers={"Authorization": f"Bearer {self.config.token}"},
            timeout=10.0,
        )

    def _vm_names(self) -> list[str]:
        return sorted(str(vm["name"]) for vm in self.daemon.list_vms() if vm.get("state") not in ("stopped", "lost"))

    def registration(self) -> dict[str, Any]:
        info = self.daemon.host_info()
        migration = self.daemon.config.migration_advertise or f"{info['migration_host']}:{info['migration_port']}"
        return {
            "name": info["name"],
            "chip_id": str(info["chip_id"]),
            "product": str(info["product"]),
            "tcb": int(info["reported_tcb_raw"] or 0),
            "tcb_text": str(info["reported_tcb"] or ""),
            "pool": info["pool"],
            "region": self.config.region,
            "zone": self.config.zone,
            "vcpus": self.config.vcpus,
            "memory_gib": self.config.memory_gib,
            "api_url": self.config.api_url,
            "migration_address": migration,
            "vms": self._vm_names(),
        }

    def _run(self) -> None:
        delay = 0.2
        name = self.daemon.config.name
        while not self._stop.is_set():
            try:
                if not self.registered.is_set():
                    response = self._post("/providers/Cvmotion.Fabric/hosts/register", self.registration())
                    if response.status_code >= 400:
                        log.error("registration refused: HTTP %d %s", response.status_code, response.text[:500])
                    else:
                        self.registered.set()
                        delay = 0.2
                        log.info("registered with %s", self.config.controller_url)
                else:
                    response = self._post(
                        f"/providers/Cvmotion.Fabric/hosts/{name}/heartbeat", {"vms": self._vm_names()}
                    )
                    if response.status_code == 404:
                        self.registered.clear()  # the controller lost us: register again at once
                        continue
                    if response.status_code >= 400:
                        log.warning("heartbeat refused: HTTP %d %s", response.status_code, response.text[:300])
            except httpx.HTTPError as exc:
                log.warning("controller %s unreachable: %s", self.config.controller_url, exc)
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._stop.wait(self.config.interval if self.registered.is_set() else delay)
            if not self.registered.is_set():
                delay = min(delay * 2, 5.0)
