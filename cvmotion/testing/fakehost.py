"""testing: a simulated host daemon — the host API contract the controller uses, with no VMs behind it.

It answers ``GET /v1/host``, ``POST/GET/DELETE /v1/vms[/NAME]``, ``POST /v1/vms/NAME/migrate`` and
``GET /v1/migrations[/ID]`` from memory, so controller tests and the benchmark can drive hundreds of
placements per second.  A migration completes when the destination (another ``FakeHost``) receives it.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from cvmotion.ipc.http import ServerThread, listen_socket

__all__ = ["FakeHost"]


class FakeHost:
    def __init__(self, name: str, pool: str = "pool-a", *, product: str = "Genoa", chip_id: str | None = None) -> None:
        self.name = name
        self.pool = pool
        self.product = product
        self.chip_id = chip_id or uuid.uuid5(uuid.NAMESPACE_DNS, name).hex * 4
        self.vms: dict[str, dict[str, Any]] = {}
        self.migrations: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        sock, self.url = listen_socket("127.0.0.1", 0)
        self.server = ServerThread(self._app(), sock, self.url, name=f"fakehost-{name}")

    def registration(self, *, vcpus: int = 96, memory_gib: int = 768) -> dict[str, Any]:
        return {
            "name": self.name, "chip_id": self.chip_id, "product": self.product, "tcb": 0x1B_00_00_00_00_00_00_04,
            "tcb_text": "bl=4 tee=0 snp=27 ucode=0", "pool": self.pool, "vcpus": vcpus, "memory_gib": memory_gib,
            "api_url": self.url, "migration_address": "127.0.0.1:1", "vms": sorted(self.vms),
        }  # fmt: skip

    def _app(self) -> FastAPI:
        app = FastAPI()

        def missing(name: str) -> JSONResponse:
            return JSONResponse({"error": {"kind": "NotFound", "message": f"no VM {name}"}}, status_code=404)

        @app.post("/v1/vms", status_code=201)
        def create(body: dict[str, Any]) -> Any:
            with self.lock:
                if body["name"] in self.vms:
                    return JSONResponse({"error": {"kind": "Conflict", "message": "exists"}}, status_code=409)
                vm = {"name": body["name"], "state": "running", "host": self.name, "spec": body}
                self.vms[body["name"]] = vm
            return vm

        @app.get("/v1/vms")
        def listing() -> Any:
            return {"vms": list(self.vms.values())}

        @app.get("/v1/vms/{name}")
        def get(name: str) -> Any:
            return self.vms.get(name) or missing(name)

        @app.delete("/v1/vms/{name}")
        def delete(name: str) -> Any:
            with self.lock:
                if self.vms.pop(name, None) is None:
                    return missing(name)
            return {"deleted": name}

        @app.post("/v1/vms/{name}/migrate", status_code=202)
        def migrate(name: str, body: dict[str, Any]) -> Any:
            with self.lock:
                vm = self.vms.get(name)
                if vm is None:
                    return missing(name)
            mig_id = uuid.uuid4().hex[:12]
            started = time.monotonic()
            httpx.post(f"{body['destination']}/v1/_receive", json=vm, timeout=10).raise_for_status()
            took = round((time.monotonic() - started) * 1000)
            with self.lock:
                self.vms.pop(name, None)
                # The figures a real host's record has (QEMU query-migrate names), so the controller keeps them.
                self.migrations[mig_id] = {
                    "status": "completed", "total-time": took, "downtime": min(took, 1), "ram": {"transferred": 4096},
                    "x-cvmotion": {"id": mig_id, "vm": name},
                }  # fmt: skip
            return {"migration": mig_id, **self.migrations[mig_id]}

        @app.post("/v1/_receive")
        def receive(vm: dict[str, Any]) -> Any:
            with self.lock:
                self.vms[vm["name"]] = vm | {"host": self.name}
            return {}

        @app.get("/v1/migrations")
        def migrations() -> Any:
            return {"migrations": list(self.migrations.values())}

        @app.get("/v1/migrations/{mig_id}")
        def migration(mig_id: str) -> Any:
            return self.migrations.get(mig_id) or JSONResponse({"error": {"message": "no"}}, status_code=404)

        return app

    def __enter__(self) -> FakeHost:
        self.server.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.close()
