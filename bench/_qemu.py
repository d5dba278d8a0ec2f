"""bench helper: QEMU's own live migration, driven over QMP, as the baseline cvmotion is measured against.

Two ``qemu-system-x86_64 -enable-kvm`` processes on loopback: the source boots the guest image, the destination
waits with ``-incoming defer``.  QMP (``docs/interop/qmp-spec.rst``): one JSON object per line; the server
greets, the client sends ``qmp_capabilities``, then commands; asynchronous events arrive interleaved with
replies and are set aside.  TLS uses ``tls-creds-x509`` objects over certificates made here with
``cryptography`` (a throw-away CA, server and client certificates for 127.0.0.1, mutual verification).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["INSTALL_HINT", "QemuPair", "Qmp", "QmpError", "free_port", "qemu_binary", "qemu_version", "write_tls_dir"]

QEMU = "qemu-system-x86_64"
INSTALL_HINT = "apt-get update && apt-get install -y qemu-system-x86"


def qemu_binary() -> str | None:
    return shutil.which(QEMU)


def qemu_version() -> str:
    binary = qemu_binary()
    if binary is None:
        return "not installed"
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False).stdout
    return out.splitlines()[0] if out else "unknown"


class QmpError(RuntimeError):
    """QEMU answered a command with an error, or the QMP connection broke."""


class Qmp:
    """A minimal synchronous QMP client over a Unix socket; every read is bounded by ``timeout``."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except OSError:
            self._sock.close()
            raise
        self._file = self._sock.makefile("rb")
        self.events: list[dict[str, Any]] = []
        greeting = self._read()
        if "QMP" not in greeting:
            raise QmpError(f"not a QMP greeting: {greeting}")
        self.command("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise QmpError("QMP connection closed")
        message: dict[str, Any] = json.loads(line)
        return message

    def command(self, name: str, **arguments: Any) -> Any:
        request: dict[str, Any] = {"execute": name}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            message = self._read()
            if "event" in message:
                self.events.append(message)
                continue
            if "error" in message:
                raise QmpError(f"{name}: {message['error'].get('desc', message['error'])}")
            return message.get("return")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
            self._sock.close()


def write_tls_dir(directory: Path) -> None:
    """CA, server and client certificates (EC P-256) for 127.0.0.1, in the file names QEMU's x509 creds read."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
    later = now + datetime.timedelta(days=2)

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cvmotion bench QEMU CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(later)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "ca-cert.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"qemu-{role}")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(later)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(ca_key, hashes.SHA256())
        )
        (directory / f"{role}-cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        path = directory / f"{role}-key.pem"
        path.write_bytes(key_pem(key))
        os.chmod(path, 0o600)


@dataclass
class _Vm:
    proc: subprocess.Popen[bytes]
    qmp: Qmp
    serial: Path


@dataclass
class QemuPair:
    """A source QEMU running the guest and a destination QEMU waiting for it, in one temporary directory."""

    root: Path
    vms: list[_Vm] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @classmethod
    def start(
        cls, *, kernel: Path, append: str, memory: str, tls: bool, timeout: float = 30.0, extra: list[str] | None = None
    ) -> QemuPair:
        binary = qemu_binary()
        if binary is None:
            raise FileNotFoundError(f"{QEMU} is not installed ({INSTALL_HINT})")
        pair = cls(Path(tempfile.mkdtemp(prefix="cvmotion-bench-qemu-")))
        try:
            if tls:
                write_tls_dir(pair.root / "tls")
            for role in ("src", "dst"):
                qmp_path = pair.root / f"{role}.qmp"
                serial = pair.root / f"{role}.serial"
                cmd = [binary, "-enable-kvm", "-m", memory, "-kernel", str(kernel), "-append", append]
                cmd += ["-display", "none", "-nodefaults", "-no-user-config", "-serial", f"file:{serial}"]
                cmd += ["-qmp", f"unix:{qmp_path},server=on,wait=off", *(extra or [])]
                if tls:
                    endpoint = "client" if role == "src" else "server"
                    cmd += [
                        "-object",
                        f"tls-creds-x509,id=tls0,dir={pair.root / 'tls'},endpoint={endpoint},verify-peer=on",
                    ]
                if role == "dst":
                    cmd += ["-incoming", "defer"]
                log = (pair.root / f"{role}.log").open("wb")
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
                pair.procs.append(proc)
                deadline = time.monotonic() + timeout
                while True:
                    # The socket file appears at bind(), a moment before listen(): a connect in between is
                    # refused (it failed one bench run in six), so both mean "not yet".
                    with contextlib.suppress(FileNotFoundError, ConnectionRefusedError):
                        qmp = Qmp(qmp_path)
                        break
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise QmpError(
                            f"QEMU ({role}) did not start: {(pair.root / f'{role}.log').read_text()[-1000:]}"
                        )
                    time.sleep(0.02)
                pair.vms.append(_Vm(proc, qmp, serial))
        except BaseException:
            pair.close()
            raise
        return pair

    @property
    def src(self) -> _Vm:
        return self.vms[0]

    @property
    def dst(self) -> _Vm:
        return self.vms[1]

    def serial_lines(self, vm: _Vm) -> list[str]:
        try:
            return vm.serial.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def wait_serial(self, vm: _Vm, predicate: Any, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            lines = self.serial_lines(vm)
            if predicate(lines):
                return lines
            if vm.proc.poll() is not None or time.monotonic() > deadline:
                raise TimeoutError(f"QEMU serial condition not met in {timeout:.0f} s: {lines[-3:]}")
            time.sleep(0.05)

    def migrate(
        self, *, port: int, tls: bool, downtime_limit_ms: int, max_bandwidth: int | None, timeout: float = 600.0
    ) -> dict[str, Any]:
        """Migrate src -> dst over ``tcp:127.0.0.1:port``; returns the final ``query-migrate`` of the source."""
        params: dict[str, Any] = {"downtime-limit": downtime_limit_ms}
        if max_bandwidth is not None:
            params["max-bandwidth"] = max_bandwidth
        if tls:
            params["tls-creds"] = "tls0"
            self.dst.qmp.command("migrate-set-parameters", **{"tls-creds": "tls0"})
        self.src.qmp.command("migrate-set-parameters", **params)
        self.src.qmp.command("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
        uri = f"tcp:127.0.0.1:{port}"
        self.dst.qmp.command("migrate-incoming", uri=uri)
        self.src.qmp.command("migrate", uri=uri)
        deadline = time.monotonic() + timeout
        while True:
            info: dict[str, Any] = self.src.qmp.command("query-migrate")
            if info.get("status") in ("failed", "cancelled"):
                break
            # QEMU sets "completed" a moment before it fills in total-time and downtime: wait for them.
            if info.get("status") == "completed" and info.get("total-time"):
                break
            if time.monotonic() > deadline:
                with contextlib.suppress(QmpError):
                    self.src.qmp.command("migrate_cancel")
                raise TimeoutError(f"QEMU migration still {info.get('status')} after {timeout:.0f} s")
            time.sleep(0.01)
        # The destination runs once it has loaded the state; wait for that (bounded) so its status is honest.
        deadline = time.monotonic() + 30
        while self.dst.qmp.command("query-status").get("status") != "running" and time.monotonic() < deadline:
            time.sleep(0.01)
        info["destination-status"] = self.dst.qmp.command("query-status").get("status")
        blackout = guest_blackout_ms(self.src.qmp.events, self.dst.qmp.events)
        if blackout is not None:
            info["x-blackout-ms"] = blackout
        return info

    def close(self) -> None:
        for vm in self.vms:
            with contextlib.suppress(QmpError, OSError):
                vm.qmp.command("quit")
            vm.qmp.close()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        shutil.rmtree(self.root, ignore_errors=True)


def guest_blackout_ms(src_events: list[dict[str, Any]], dst_events: list[dict[str, Any]]) -> float | None:
    """The guest's blackout as it lives it: the source's ``STOP`` event to the destination's ``RESUME`` (both
    QEMUs stamp events with the same host clock).  QEMU's own ``downtime`` is the source's view: it ends when
    the source has sent the last state, before the destination has loaded it and started the vCPUs."""

    def stamp(events: list[dict[str, Any]], name: str) -> float | None:
        for event in events:
            if event.get("event") == name and isinstance(event.get("timestamp"), dict):
                ts = event["timestamp"]
                return float(ts["seconds"]) + float(ts["microseconds"]) / 1e6
        return None

    stopped, resumed = stamp(src_events, "STOP"), stamp(dst_events, "RESUME")
    if stopped is None or resumed is None:
        return None
    return (resumed - stopped) * 1000.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
