"""A simulated host with the maintenance contract too: the in-place update, Scheduled Events, attestation.

It extends ``cvmotion.testing.fakehost.FakeHost`` (create, delete, migrate, query-migrate) with
``POST/GET /v1/host/maintenance``, ``PUT/GET /v1/vms/{name}/scheduledevents`` and
``GET /v1/vms/{name}/attestation``, answered from memory as the interface contract says, plus knobs a
test turns: migrations that fail (a destination dying), a maintenance that fails or stays in progress.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from cvmotion.testing.fakehost import FakeHost

_TOKENS = itertools.count(1)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"kind": "Refused", "message": message}}, status_code=status)


class MaintenanceFakeHost(FakeHost):
    def __init__(self, name: str, pool: str = "pool-a", **kw: Any) -> None:
        self.maintenances: dict[str, dict[str, Any]] = {}
        self.documents: dict[str, dict[str, Any]] = {}
        self.start_requests: dict[str, list[str]] = {}
        self.tokens: dict[str, str] = {}
        self.fail_migrations = 0  # the next N outgoing migrations fail (the destination died)
        self.maintenance_hold = threading.Event()  # cleared: an update stays InProgress until it is set
        self.maintenance_hold.set()
        self.puts: list[dict[str, Any]] = []
        self.gate = threading.Event()  # cleared: outgoing migrations stay active until it is set (or cancelled)
        self.gate.set()
        self.pending: dict[str, tuple[str, str]] = {}  # migration id -> (VM, destination URL) while held
        self.cancels: list[str] = []
        super().__init__(name, pool, **kw)

    def token_for(self, vm: str) -> str:
        if vm not in self.tokens:
            self.tokens[vm] = f"jti-{self.name}-{next(_TOKENS)}"
        return self.tokens[vm]

    def _complete(self, mig_id: str, name: str, destination: str) -> None:
        import httpx

        with self.lock:
            vm = self.vms.get(name)
        if vm is not None:
            httpx.post(f"{destination}/v1/_receive", json=vm, timeout=10).raise_for_status()
        with self.lock:
            self.vms.pop(name, None)
            self.tokens.pop(name, None)
            self.migrations[mig_id] = {
                "status": "completed", "total-time": 812, "downtime": 23,
                "ram": {"transferred": 123456, "remaining": 0, "dirty-sync-count": 3, "mbps": 900.0},
                "x-cvmotion": {"id": mig_id, "vm": name},
            }  # fmt: skip

    def _app(self) -> FastAPI:
        app = super()._app()
        replaced = ("/v1/vms/{name}/migrate", "/v1/migrations/{mig_id}")
        routes = [r for r in app.router.routes if getattr(r, "path", "") not in replaced]
        app.router.routes[:] = routes

        @app.post("/v1/vms/{name}/migrate", status_code=202)
        def migrate(name: str, body: dict[str, Any]) -> Any:
            with self.lock:
                vm = self.vms.get(name)
                if vm is None:
                    return _error(404, f"no VM {name}")
                failing = self.fail_migrations > 0
                self.fail_migrations -= 1 if failing else 0
            mig_id = f"m{next(_TOKENS):011d}"
            if failing:
                why = "destination stopped answering"
                status = {"status": "failed", "error-desc": why, "x-cvmotion": {"id": mig_id, "vm": name}}
                self.migrations[mig_id] = status
                return {"migration": mig_id, **status}
            if not self.gate.is_set():
                self.pending[mig_id] = (name, body["destination"])
                self.migrations[mig_id] = {
                    "status": "active", "ram": {"remaining": 1 << 30, "dirty-sync-count": 1, "mbps": 100.0},
                    "x-cvmotion": {"id": mig_id, "vm": name},
                }  # fmt: skip
                return {"migration": mig_id, **self.migrations[mig_id]}
            self._complete(mig_id, name, body["destination"])
            return {"migration": mig_id, **self.migrations[mig_id]}

        @app.get("/v1/migrations/{mig_id}")
        def migration(mig_id: str) -> Any:
            held = self.pending.get(mig_id)
            if held is not None and self.gate.is_set():
                self.pending.pop(mig_id, None)
                self._complete(mig_id, *held)
            return self.migrations.get(mig_id) or _error(404, f"no migration {mig_id}")

        @app.post("/v1/migrations/{mig_id}/cancel")
        def cancel(mig_id: str) -> Any:
            self.cancels.append(mig_id)
            if self.pending.pop(mig_id, None) is not None:
                self.migrations[mig_id] |= {"status": "cancelled", "error-desc": "cancelled"}
            return {"cancelled": mig_id}

        @app.get("/v1/vms/{name}/attestation")
        def attestation(name: str) -> Any:
            if name not in self.vms:
                return _error(404, f"no VM {name}")
            token = self.token_for(name)
            return {"jti": token, "chip_id": self.chip_id, "tcb": "bl=4 tee=0 snp=27", "platform": "emulated"}

        @app.put("/v1/vms/{name}/scheduledevents")
        def put_events(name: str, body: dict[str, Any]) -> Any:
            if name not in self.vms:
                return _error(404, f"no VM {name}")
            stored = self.documents.get(name, {"DocumentIncarnation": -1})
            if body["DocumentIncarnation"] < stored["DocumentIncarnation"]:
                return _error(409, "older incarnation")
            self.documents[name] = body
            self.puts.append({"vm": name, **body})
            return body

        @app.get("/v1/vms/{name}/scheduledevents")
        def get_events(name: str) -> Any:
            if name not in self.vms:
                return _error(404, f"no VM {name}")
            doc = self.documents.get(name, {"DocumentIncarnation": 0, "Events": []})
            return {"document": doc, "startRequests": self.start_requests.get(name, [])}

        @app.post("/v1/host/maintenance", status_code=202)
        def start_maintenance(body: dict[str, Any]) -> Any:
            with self.lock:
                if body["id"] in self.maintenances:
                    return self.maintenances[body["id"]]
                if any(m["status"] == "InProgress" for m in self.maintenances.values()):
                    return _error(409, "another update is in progress")
                record = {
                    "id": body["id"], "kind": body["kind"], "status": "InProgress", "startedAt": 1.0, "endedAt": None,
                    "platformRestarted": True, "daemonRestarted": True, "error": None,
                    "vms": [
                        {"name": vm, "pauseMs": 42.5, "reattested": True, "outcome": "Succeeded", "reason": None}
                        for vm in sorted(self.vms)
                    ],
                }  # fmt: skip
                self.maintenances[body["id"]] = record
                for vm in self.vms:
                    self.tokens.pop(vm, None)  # re-attested: a new token
            return record

        @app.get("/v1/host/maintenance/{mid}")
        def get_maintenance(mid: str) -> Any:
            record = self.maintenances.get(mid)
            if record is None:
                return _error(404, f"no maintenance {mid}")
            if record["status"] == "InProgress" and self.maintenance_hold.is_set():
                record["status"], record["endedAt"] = "Succeeded", 2.0
            return record

        return app
