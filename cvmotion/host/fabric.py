"""host layer: a whole cvmotion fabric on one machine, as real processes on loopback.

``LocalFabric`` starts the emulated KDS, the attestation service, a key-release service and N host daemons
(``cvmotion host serve``), each a separate process with its own data directory, and tears everything down
again — including the VM and platform processes the daemons started (they outlive a daemon on purpose).
Used by ``cvmotion demo``, the end-to-end tests and the benchmarks.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from cvmotion.errors import UsageError
from cvmotion.ipc.http_client import default_ssl_context

__all__ = ["FabricHost", "LocalFabric"]

_URL = re.compile(r"(http://127\.0\.0\.1:\d+)")
_START_TIMEOUT = 90.0


def _cvmotion(*args: str) -> list[str]:
    return [sys.executable, "-m", "cvmotion", *args]


@dataclass
class FabricHost:
    name: str
    url: str
    data_dir: Path
    process: subprocess.Popen[bytes]
    info: dict[str, Any] = field(default_factory=dict)


class LocalFabric:
    """Processes of one demo/test fabric under ``root``. Use as a context manager."""

    def __init__(self, root: Path, *, product: str = "Genoa", pool: str = "demo-pool") -> None:
        self.root = root
        self.product = product
        self.pool = pool
        self.vendor_dir = root / "vendor"
        self.pool_ca_dir = root / "pool-ca"
        self.env = dict(os.environ, CVMOTION_HOME=str(root / "home"), PYTHONUNBUFFERED="1")
        self._procs: list[subprocess.Popen[bytes]] = []
        self.kds_url = ""
        self.attestation_url = ""
        self.key_release_url = ""
        self.hosts: dict[str, FabricHost] = {}
        root.mkdir(parents=True, exist_ok=True)

    # -- processes ---------------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        # The child keeps its own descriptor of the log; the parent's copy is closed at once.
        with (self.root / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self._procs.append(proc)
        return proc

    def _wait_url(self, name: str, proc: subprocess.Popen[bytes]) -> str:
        path = self.root / f"{name}.log"
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            text = path.read_text(errors="replace") if path.exists() else ""
            match = _URL.search(text)
            if match:
                return match.group(1)
            if proc.poll() is not None:
                raise UsageError(f"{name} exited ({proc.returncode}): {text.strip()[-800:]}")
            time.sleep(0.05)
        raise UsageError(f"{name} did not start within {_START_TIMEOUT:.0f} s")

    def start_services(self, *, key_name: str | None = None) -> None:
        """KDS, attestation service and (with ``key_name``) a key-release service holding that key."""
        from cvmotion.abi.snp import Product
        from cvmotion.firmware.vendor import Vendor

        # The emulated vendor's roots for this product exist before anyone is asked to trust them.
        Vendor.open(self.vendor_dir).roots(Product.from_name(self.product))
        kds = _cvmotion("kds", "serve", "--vendor-dir", str(self.vendor_dir), "--listen", "127.0.0.1:0")
        proc = self._spawn("kds", kds)
        self.kds_url = self._wait_url("kds", proc)
        att_dir = self.root / "attestation"
        proc = self._spawn(
            "attestation",
            _cvmotion(
                "attestation", "serve", "--data-dir", str(att_dir), "--listen", "127.0.0.1:0",
                "--kds", self.kds_url, "--emulated-vendor-dir", str(self.vendor_dir),
            ),
        )  # fmt: skip
        self.attestation_url = self._wait_url("attestation", proc)
        if key_name is None:
            return
        kr_dir = self.root / "key-release"
        policy = self.root / "release-policy.json"
        policy.write_text(
            json.dumps(
                {
                    "version": "1.0.0",
                    "anyOf": [
                        {
                            "authority": self.attestation_url,
                            "allOf": [
                                {"claim": "x-ms-attestation-type", "equals": "sevsnpvm"},
                                {"claim": "x-ms-sevsnpvm-is-debuggable", "equals": False},
                                {"claim": "x-cvmotion-platform", "equals": "emulated"},
                            ],
                        }
                    ],
                },
                indent=2,
            )
        )
        created = subprocess.run(
            _cvmotion("attestation", "key-release", "create-key", "--data-dir", str(kr_dir), "--name", key_name,
                      "--policy", str(policy)),
            env=self.env, capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        if created.returncode != 0:
            raise UsageError(f"key-release create-key failed: {created.stderr.decode(errors='replace')}")
        proc = self._spawn(
            "key-release",
            _cvmotion("attestation", "key-release", "serve", "--data-dir", str(kr_dir), "--listen", "127.0.0.1:0"),
        )
        self.key_release_url = self._wait_url("key-release", proc)

    def start_host(self, name: str, *, pool: str | None = None, extra: list[str] | None = None) -> FabricHost:
        data_dir = self.root / name
        args = _cvmotion(
            "host", "serve", "--name", name, "--listen", "127.0.0.1:0", "--data-dir", str(data_dir),
            "--product", self.product, "--pool", pool or self.pool, "--vendor-dir", str(self.vendor_dir),
            "--pool-ca-dir", str(self.pool_ca_dir),
        )  # fmt: skip
        if self.kds_url:
            args += ["--kds", self.kds_url]
        if self.attestation_url:
            args += ["--attestation", self.attestation_url]
        if self.key_release_url:
            args += ["--key-release", self.key_release_url]
        args += extra or []
        proc = self._spawn(name, args)
        url = self._wait_url(name, proc)
        host = FabricHost(
            name, url, data_dir, proc, httpx.get(f"{url}/v1/host", timeout=10, verify=default_ssl_context()).json()
        )
        self.hosts[name] = host
        return host

    # -- teardown ----------------------------------------------------------------------------------

    def _hardware_pids(self) -> list[int]:
        pids: list[int] = []
        for host in self.hosts.values():
            for path in [host.data_dir / "platform.pid", *host.data_dir.glob("vms/*/pid")]:
                with contextlib.suppress(OSError, ValueError):
                    pids.append(int(path.read_text().strip()))
        return pids

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for pid in self._hardware_pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        for pid in self._hardware_pids():
            for _ in range(50):
                try:
                    os.kill(pid, 0)
                except (ProcessLookupError, PermissionError):
                    break
                time.sleep(0.1)
            else:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> LocalFabric:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
