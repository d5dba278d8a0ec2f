"""The HTTP services held to their OpenAPI documents, each as a real ``cvmotion ... serve`` process on loopback.

Adding a service to the contract suite is one ``ContractService`` in ``SERVICES``:

* ``start(fabric)`` starts the real process (its data made under ``fabric.base``, other services reached
  through ``fabric.url(name)``) and returns something with ``url`` and ``close()``;
* ``app(fabric)`` builds the same FastAPI app in this process, never served: its route table is compared
  with the document the process serves, so an undocumented route fails a test;
* ``stateful``: the document has OpenAPI links, so Schemathesis also runs its state machine over them.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Protocol

from fastapi import FastAPI

from cvmotion.abi.snp import Product
from cvmotion.firmware.chip import Chip
from cvmotion.firmware.vendor import Vendor

CLI = [sys.executable, "-m", "cvmotion"]
SECRET_HEX = "c0ffee" * 8
START_TIMEOUT_S = 60.0


class Running(Protocol):
    url: str

    def close(self) -> None: ...


class ServeProcess:
    """``cvmotion ARGS`` that binds, then announces ``... URL`` as the last word of its first line."""

    def __init__(self, log: Path, *args: str) -> None:
        self.log = log
        with log.open("ab") as err:
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            self.proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=err, env=env)
        out = self.proc.stdout
        assert out is not None
        with selectors.DefaultSelector() as sel:
            sel.register(out, selectors.EVENT_READ)
            line = out.readline().decode(errors="replace") if sel.select(START_TIMEOUT_S) else ""
        if "http://" not in line:
            self.close()
            raise RuntimeError(f"{args[:2]} did not announce its URL: {line!r} {self.errors()[-2000:]}")
        self.url = line.split()[-1]
        # Keep draining stdout: a process blocked on a full pipe would look like a hang.
        self._drain = threading.Thread(target=lambda: [None for _ in iter(out.readline, b"")], daemon=True)
        self._drain.start()

    def errors(self) -> str:
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(20)
        if self.proc.stdout is not None:
            if hasattr(self, "_drain"):
                self._drain.join(10)  # the process is gone: its pipe is at EOF
            self.proc.stdout.close()


class Fabric:
    """The services of one test module, each started on first use and stopped at the end."""

    def __init__(self, base: Path, vendor: Vendor) -> None:
        self.base = base
        self.vendor = vendor
        self.chips: dict[Product, Chip] = {}
        self._running: dict[str, Running] = {}

    def url(self, name: str) -> str:
        if name not in self._running:
            self._running[name] = SERVICES[name].start(self)
        return self._running[name].url

    def serve(self, name: str, *args: str) -> ServeProcess:
        return ServeProcess(self.base / f"{name}.err", *args, "--listen", "127.0.0.1:0")

    def close(self) -> dict[str, str]:
        """Stop every process; their stderr, by service."""
        logs: dict[str, str] = {}
        for name, running in reversed(self._running.items()):
            running.close()
            if isinstance(running, ServeProcess):
                logs[name] = running.errors()
        return logs


@dataclass(frozen=True)
class ContractService:
    name: str
    start: Callable[[Fabric], Running]
    app: Callable[[Fabric], FastAPI]
    stateful: bool = False


# -- the emulated KDS: a vendor that made one chip of each product ---------------------------------------


def _start_kds(fabric: Fabric) -> Running:
    for seed, product in enumerate(Product, start=13_000):
        fabric.vendor.cert_chain_pem(product)  # the roots exist before the process reads the directory
        fabric.vendor.vlek_chain_pem(product)
        fabric.chips[product] = Chip.create(fabric.base / f"chip-{product.value}", fabric.vendor, product, seed)
    return fabric.serve("kds", "kds", "serve", "--vendor-dir", str(fabric.vendor.root))


def _kds_app(fabric: Fabric) -> FastAPI:
    from cvmotion.firmware.kds import Kds
    from cvmotion.firmware.kds_http import create_app

    return create_app(Kds(fabric.vendor))


# -- the attestation service, trusting the emulated vendor and fetching from the KDS ---------------------


def _start_attestation(fabric: Fabric) -> Running:
    kds = fabric.url("kds")
    data, vendor = str(fabric.base / "att"), str(fabric.vendor.root)
    return fabric.serve(
        "attestation", "attestation", "serve", "--data-dir", data, "--emulated-vendor-dir", vendor, "--kds", kds
    )


def _attestation_app(fabric: Fabric) -> FastAPI:
    from cvmotion.attestation.keys import SigningKeyStore
    from cvmotion.attestation.service import AttestationService
    from cvmotion.attestation.service_http import create_app
    from cvmotion.attestation.tenants import load_tenants
    from cvmotion.attestation.trust import TrustStore

    keys = SigningKeyStore.open(fabric.base / "att-in-process", overlap=timedelta(days=1))
    service = AttestationService(trust=TrustStore.amd(), keys=keys, tenants=load_tenants(None), issuer="http://x")
    return create_app(service)


# -- the key-release service, one key releasable to the attestation service's tokens --------------------

RELEASE_POLICY = (
    '{"version": "1.0.0", "anyOf": [{"authority": "%s", "allOf": '
    '[{"claim": "x-ms-attestation-type", "equals": "sevsnpvm"}]}]}'
)


def _start_key_release(fabric: Fabric) -> Running:
    data = fabric.base / "kr"
    policy = fabric.base / "release.json"
    policy.write_text(RELEASE_POLICY % fabric.url("attestation"))
    made = subprocess.run(
        [*CLI, "attestation", "key-release", "create-key", "--data-dir", str(data), "--name", "data-key",
         "--policy", str(policy), "--secret-hex", SECRET_HEX],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if made.returncode != 0:
        raise RuntimeError(f"create-key failed: {made.stderr}")
    return fabric.serve("key-release", "attestation", "key-release", "serve", "--data-dir", str(data))


def _key_release_app(fabric: Fabric) -> FastAPI:
    from cvmotion.attestation.keyrelease import KeyStore
    from cvmotion.attestation.keyrelease_http import KeyReleaseService, create_app

    def no_party(issuer: str) -> object:
        raise AssertionError(f"the in-process app is never served (asked for {issuer})")

    return create_app(KeyReleaseService(KeyStore(fabric.base / "kr-in-process"), relying_party=no_party))  # type: ignore[arg-type]


SERVICES: dict[str, ContractService] = {
    s.name: s
    for s in (
        ContractService("kds", _start_kds, _kds_app),
        ContractService("attestation", _start_attestation, _attestation_app),
        ContractService("key-release", _start_key_release, _key_release_app, stateful=True),
    )
}
