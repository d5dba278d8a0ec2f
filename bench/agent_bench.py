"""Benchmark: migration-agent session setup (cvmotion.agent), both MAs in one process on one core.

* RA-TLS certificate: ephemeral P-384 key, MSG_REPORT_REQ through the MA's guest channel (AES-GCM both
  ways, ECDSA P-384 report signature), X.509 build and ECDSA signature;
* RA-TLS verification: certificate checks, report verification with a cached endorsement chain (ECDSA
  P-384), REPORT_DATA binding;
* a whole session: HELLO both ways, mutual evidence verification, TLS 1.3 mutual handshake over memory BIOs,
  the forward and backward policies, K_f/K_b through the firmware — i.e. the setup latency a migration pays
  before the first page moves (network time excluded: the relay is a function call).

Usage: .venv/bin/python bench/agent_bench.py [--sessions 40] [--rounds 5] [--cpu N]
Each figure is the median of ``--rounds`` rounds; the process is pinned to one CPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import ssl
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cryptography
from cryptography.hazmat.primitives import serialization
from rich.console import Console
from rich.table import Table

from cvmotion.abi.snp import GuestPolicy, PolicyFlag, Product
from cvmotion.agent.destination import DestinationSession
from cvmotion.agent.identity import MigrationAgentIdentity
from cvmotion.agent.policy import AgentConfig, MigrationPolicy
from cvmotion.agent.pool import PoolAuthority, create_pool_ca, issue_pool_credential
from cvmotion.agent.ratls import issue_ratls_certificate, verify_ratls_certificate
from cvmotion.agent.session import SessionBase, SessionState
from cvmotion.agent.source import SourceSession
from cvmotion.attestation.trust import TrustStore
from cvmotion.firmware.chip import Chip
from cvmotion.firmware.device import GuestHandle, SecureProcessor
from cvmotion.firmware.kds import Kds
from cvmotion.firmware.launch import PAGE_SIZE, PageType
from cvmotion.firmware.vendor import Vendor

MIGRATABLE = GuestPolicy(flags=PolicyFlag.RESERVED_MBO | PolicyFlag.SMT | PolicyFlag.MIGRATE_MA)


class _NoHardware:
    """import_prepare only stores the hardware; session setup never touches it."""


def _host(
    root: Path, vendor: Vendor, seed: int, ca: PoolAuthority, trust: TrustStore
) -> tuple[SecureProcessor, AgentConfig]:
    chip = Chip.create(root / f"host{seed}", vendor, Product.GENOA, seed)
    sp = SecureProcessor(chip, endorsements=Kds(vendor))
    cred = issue_pool_credential(ca, chip.chip_id, "bench", now=dt.datetime.now(dt.UTC))
    der = cred.public_bytes(serialization.Encoding.DER)
    return sp, AgentConfig(trust=trust, pool_credential=der, pool_cas=(ca.cert,))


def _guest(sp: SecureProcessor, policy: MigrationPolicy) -> GuestHandle:
    handle = sp.launch_start(MIGRATABLE)
    sp.launch_update(handle, 0x100000, PageType.NORMAL, bytes(PAGE_SIZE))
    sp.launch_finish(handle, host_data=policy.host_data())
    sp.activate(handle)
    return handle


def _relay(source: SourceSession, destination: DestinationSession) -> int:
    queue: list[tuple[SessionBase, bytes]] = [(destination, f) for f in source.start()]
    frames = 0
    while queue:
        target, frame = queue.pop(0)
        frames += 1
        other: SessionBase = source if target is destination else destination
        queue.extend((other, out) for out in target.receive(frame))
    if (source.state, destination.state) != (SessionState.ESTABLISHED, SessionState.ESTABLISHED):
        raise SystemExit(f"session failed: {source.error} / {destination.error}")
    return frames


def timed(fn: Callable[[], object], n: int) -> float:
    """Mean seconds per call over ``n`` calls (after one warm-up); ``main`` takes the median of rounds."""
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cpu", type=int, default=0, help="CPU to pin to (-1: no pinning)")
    args = parser.parse_args()
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        vendor = Vendor.open(root / "vendor")
        trust = TrustStore.amd().with_anchor(vendor.roots(Product.GENOA).ark.cert)
        ca = create_pool_ca(root / "ca", now=dt.datetime.now(dt.UTC))
        (sp_a, cfg_a), (sp_b, cfg_b) = _host(root, vendor, 1, ca, trust), _host(root, vendor, 2, ca, trust)
        ma_a, ma_b = MigrationAgentIdentity.launch(sp_a), MigrationAgentIdentity.launch(sp_b)
        policy = MigrationPolicy(allowed_pools=("bench",))
        cred = issue_ratls_certificate(ma_a, now=dt.datetime.now(dt.UTC))

        def issue() -> None:
            issue_ratls_certificate(ma_a, now=dt.datetime.now(dt.UTC))

        def verify() -> None:
            verify_ratls_certificate(cred.der, trust, at=dt.datetime.now(dt.UTC))

        frames = [0]

        def session() -> None:
            handle = _guest(sp_a, policy)
            sid = os.urandom(16)
            ref = sp_b.migration.import_prepare(sid, _NoHardware())  # type: ignore[arg-type]
            src = SourceSession(ma_a, handle, policy.canonical(), cfg_a, session_id=sid)
            dst = DestinationSession(ma_b, ref, cfg_b, session_id=sid)
            frames[0] = _relay(src, dst)
            sp_a.migration.export_abort(handle)
            sp_a.decommission(handle)
            sp_b.migration.import_discard(ref)

        rows: dict[str, list[float]] = {"issue": [], "verify": [], "session": []}
        for _ in range(args.rounds):
            rows["issue"].append(timed(issue, 20))
            rows["verify"].append(timed(verify, 50))
            rows["session"].append(timed(session, args.sessions))

    table = Table(title="cvmotion.agent — MA session setup (one core, in-process relay)")
    for col in ("operation", "median", "per second"):
        table.add_column(col, justify="right" if col != "operation" else "left")
    labels = {
        "issue": "RA-TLS certificate (key, report via guest message, X.509)",
        "verify": "RA-TLS verification (cached chain)",
        "session": f"full session setup, both MAs ({frames[0]} frames relayed)",
    }
    for key, label in labels.items():
        median = statistics.median(rows[key])
        table.add_row(label, f"{median * 1e3:.2f} ms", f"{1 / median:,.0f}")
    console = Console()
    console.print(table)
    console.print(
        f"Python {platform.python_version()}, cryptography {cryptography.__version__}, {ssl.OPENSSL_VERSION}, "
        f"{os.cpu_count()} CPUs ({platform.machine()}), pinned to CPU {args.cpu}"
    )


if __name__ == "__main__":
    main()
