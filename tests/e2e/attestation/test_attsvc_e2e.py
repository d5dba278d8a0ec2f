"""End to end with real processes on loopback: emulated KDS, attestation service (2 workers), key-release
service, and the CLI — evidence from ``cvmotion platform report`` becomes a token that ``verify-token``
accepts, then buys a secret from the key-release service through an attested transfer key."""

from __future__ import annotations

import hashlib
import json
import selectors
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from cvmotion.attestation.client import AttestationClient
from cvmotion.attestation.keyrelease import TransferKey
from cvmotion.attestation.keyrelease_http import KeyReleaseClient
from cvmotion.errors import PolicyViolation

CLI = [sys.executable, "-m", "cvmotion"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, check=False)


class Service:
    """A ``serve`` process; its URL is the last word of its first line (it binds before announcing)."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout=30):
                self.stop()
                pytest.fail(f"{args[0]} did not announce its URL within 30 s")
        line = self.proc.stdout.readline()
        if "listening on" not in line and " on http" not in line:
            self.stop()
            pytest.fail(f"unexpected first line from {args}: {line!r}")
        self.url = line.split()[-1]

    def stop(self) -> str:
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out or ""


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    base = tmp_path_factory.mktemp("e2e-attest")
    vendor, host = base / "vendor", base / "host"
    created = _cli("platform", "create", "--data-dir", str(host), "--vendor-dir", str(vendor), "--seed", "4242")
    assert created.returncode == 0, created.stderr
    kds = Service("kds", "serve", "--vendor-dir", str(vendor), "--listen", "127.0.0.1:0")
    att = Service(
        "attestation", "serve", "--data-dir", str(base / "att"), "--listen", "127.0.0.1:0",
        "--emulated-vendor-dir", str(vendor), "--kds", kds.url, "--workers", "2", "--token-lifetime", "600",
    )  # fmt: skip
    kr_dir = base / "kr"
    policy = {
        "version": "1.0.0",
        "anyOf": [
            {
                "authority": att.url,
                "allOf": [
                    {"claim": "x-ms-attestation-type", "equals": "sevsnpvm"},
                    {"claim": "x-cvmotion-platform", "equals": "emulated"},
                    {"claim": "x-ms-sevsnpvm-is-debuggable", "equals": False},
                    {"claim": "x-ms-sevsnpvm-vmpl", "equals": 0},
                ],
            }
        ],
    }
    (base / "release.json").write_text(json.dumps(policy))
    made = _cli(
        "attestation", "key-release", "create-key", "--data-dir", str(kr_dir), "--name", "kvstore-data-key",
        "--policy", str(base / "release.json"), "--secret-hex", "c0ffee" * 8,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    kr = Service("attestation", "key-release", "serve", "--data-dir", str(kr_dir), "--listen", "127.0.0.1:0")
    try:
        yield {"base": base, "host": host, "vendor": vendor, "att": att, "kr": kr}
    finally:
        logs = {name: svc.stop() for name, svc in (("kr", kr), ("att", att), ("kds", kds))}
        assert "Traceback" not in "".join(logs.values()), logs


def _report(fabric: dict[str, object], report_data: bytes, tag: str) -> tuple[Path, Path, Path]:
    base = fabric["base"]
    assert isinstance(base, Path)
    out = (base / f"{tag}.bin", base / f"{tag}-vcek.der", base / f"{tag}-chain.pem")
    done = _cli(
        "platform", "report", "--data-dir", str(fabric["host"]), "--report-data", report_data.hex(),
        "--out", str(out[0]), "--vcek-out", str(out[1]), "--chain-out", str(out[2]),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out


def test_cli_token_and_verify(fabric: dict[str, object]) -> None:
    att = fabric["att"]
    assert isinstance(att, Service)
    report, vcek, chain = _report(fabric, b"\x01\x02", "cli")
    issued = _cli(
        "attest", "token", "--report", str(report), "--vcek", str(vcek), "--chain", str(chain),
        "--service", att.url, "--nonce", "e2e", "--json",
    )  # fmt: skip
    assert issued.returncode == 0, issued.stdout + issued.stderr
    doc = json.loads(issued.stdout)
    assert doc["claims"]["x-cvmotion-platform"] == "emulated"
    assert doc["claims"]["nonce"] == "e2e"
    assert doc["claims"]["exp"] - doc["claims"]["iat"] == 600
    checked = _cli("attestation", "verify-token", doc["token"], "--jwks", f"{att.url}/certs", "--json")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert json.loads(checked.stdout)["claims"]["jti"] == doc["claims"]["jti"]
    # Without a chain: the service asks the KDS (and caches), in whichever worker gets the request.
    with AttestationClient(att.url) as client:
        for _ in range(4):
            assert client.attest(report.read_bytes(), None).count(".") == 2


def test_guest_obtains_its_data_key(fabric: dict[str, object]) -> None:
    att, kr = fabric["att"], fabric["kr"]
    assert isinstance(att, Service)
    assert isinstance(kr, Service)
    transfer = TransferKey.generate()
    runtime = transfer.runtime_data()
    report, vcek, chain = _report(fabric, hashlib.sha256(runtime).digest(), "skr")
    pem = vcek.read_bytes()
    chain_pem = x509.load_der_x509_certificate(pem).public_bytes(Encoding.PEM) + chain.read_bytes()
    with AttestationClient(att.url) as client:
        token = client.attest(report.read_bytes(), chain_pem, runtime, data_type="JSON")
        with KeyReleaseClient(kr.url) as kr_client:
            assert kr_client.release("kvstore-data-key", token, transfer) == bytes.fromhex("c0ffee" * 8)
    # A VMPL-1 report of the same guest gets a token, but the release policy wants VMPL 0.
    base = fabric["base"]
    assert isinstance(base, Path)
    vmpl1 = _cli(
        "platform", "report", "--data-dir", str(fabric["host"]), "--report-data", hashlib.sha256(runtime).hexdigest(),
        "--vmpl", "1", "--out", str(base / "v1.bin"),
    )  # fmt: skip
    assert vmpl1.returncode == 0, vmpl1.stderr
    with AttestationClient(att.url) as client, KeyReleaseClient(kr.url) as kr_client:
        token = client.attest((base / "v1.bin").read_bytes(), chain_pem, runtime, data_type="JSON")
        with pytest.raises(PolicyViolation, match="vmpl"):
            kr_client.release("kvstore-data-key", token, transfer)
