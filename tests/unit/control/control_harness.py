"""Helpers for the controller tests: a client of an in-process controller's API (bounded operation waits)."""

from __future__ import annotations

import time
from typing import Any

import httpx

from cvmotion.control.auth import Role, issue_token
from cvmotion.control.resources import VmPut
from cvmotion.control.service import OWNER_TOKEN_FILE, FleetController
from cvmotion.testing.fakehost import FakeHost

RG = "/subscriptions/default/resourceGroups"
VMS = "providers/Microsoft.Compute/virtualMachines"
# A 2-vCPU, 8 GiB VM whose owner enabled confidential live migration, created on h1.
OPTED_IN_ON_H1 = VmPut.model_validate(
    {
        "properties": {
            "hardwareProfile": {"vmSize": "Standard_DC2as_v5"},
            "securityProfile": {"confidentialLiveMigration": "Enabled"},
            "storageProfile": {"imageReference": {"id": "kvstore"}},
            "placement": {"host": "h1"},
        }
    }
)


class Api:
    def __init__(self, client: httpx.Client, ctl: FleetController) -> None:
        self.client = client
        self.ctl = ctl
        self.owner = (ctl.data_dir / OWNER_TOKEN_FILE).read_text().strip()

    def token(self, role: Role, sub: str = "*") -> str:
        return self.ctl.transaction(lambda s: issue_token(s, role, sub))

    def req(self, method: str, path: str, body: Any = None, token: str | None = "owner") -> Any:
        headers = {} if token is None else {"Authorization": f"Bearer {self.owner if token == 'owner' else token}"}
        return self.client.request(method, path, json=body, headers=headers)

    def wait(self, response: Any, timeout: float = 20.0) -> dict[str, Any]:
        """Poll the response's Azure-AsyncOperation until it settles (bounded)."""
        url = response.headers["Azure-AsyncOperation"].split("://", 1)[1].split("/", 1)[1]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            op: dict[str, Any] = self.req("GET", "/" + url).json()
            if op["status"] != "InProgress":
                return op
            self.ctl.wake_workers()
            time.sleep(0.02)
        raise AssertionError(f"operation {url} did not settle")

    def vm_body(self, clm: str = "Disabled", size: str = "Standard_DC2as_v5", host: str | None = None) -> Any:
        props: dict[str, Any] = {
            "hardwareProfile": {"vmSize": size},
            "securityProfile": {"confidentialLiveMigration": clm},
            "storageProfile": {"imageReference": {"id": "kvstore"}},
        }
        if host:
            props["placement"] = {"host": host}
        return {"location": "local", "properties": props}

    def create(self, rg: str, name: str, **kw: Any) -> Any:
        return self.req("PUT", f"{RG}/{rg}/{VMS}/{name}", self.vm_body(**kw))

    def register(self, host: FakeHost) -> Any:
        return self.req("POST", "/providers/Cvmotion.Fabric/hosts/register", host.registration())
