"""Benchmark: SEV-SNP report verifications per second on one core (attestation.verify).

Measures, on the real Genoa v5 vector (tests/vectors/snp/genoa-v5):

* the floor: one ECDSA P-384/SHA-384 verification with ``cryptography`` (what every report costs);
* ``verify_report`` with a warm ChainCache, same certificate objects (a service holding parsed chains);
* ``verify_report`` with a warm ChainCache, freshly parsed certificates each time (a service given PEM per
  request; parsing included);
* ``verify_report`` uncached (three RSA-4096 PSS verifications + ECDSA every time), for context;
* ``validate`` against a typical policy.

Usage: .venv/bin/python bench/verify_bench.py [--seconds 0.5] [--rounds 9] [--cpu N]
Each figure is the median of ``--rounds`` interleaved timed rounds; the process is pinned to one CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import cryptography
from cryptography.hazmat.backends.openssl import backend
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from rich.console import Console
from rich.table import Table

from cvmotion.abi.snp import SIGNED_LEN, AttestationReport
from cvmotion.attestation.evidence import load_certificate, load_certificates
from cvmotion.attestation.policy import AttestationPolicy
from cvmotion.attestation.trust import TrustStore
from cvmotion.attestation.validate import validate
from cvmotion.attestation.verify import ChainCache, VerifyOptions, verify_report

VECTOR = Path(__file__).resolve().parent.parent / "tests" / "vectors" / "snp" / "genoa-v5"


def calibrate(fn: Callable[[], object], seconds: float) -> int:
    """How many calls of ``fn`` take about ``seconds``."""
    fn()
    n = 1
    while True:
        start = time.perf_counter()
        for _ in range(n):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed > 0.05:
            return max(1, int(n * seconds / elapsed))
        n *= 2


def measure(cases: list[tuple[str, Callable[[], object]]], seconds: float, rounds: int) -> dict[str, float]:
    """Median ops/s per case. Rounds interleave the cases, so a noisy neighbour hits them all alike."""
    batches = {name: calibrate(fn, seconds) for name, fn in cases}
    samples: dict[str, list[float]] = {name: [] for name, _ in cases}
    for _ in range(rounds):
        for name, fn in cases:
            start = time.perf_counter()
            for _ in range(batches[name]):
                fn()
            samples[name].append(batches[name] / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in samples.items()}


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{model}, {os.cpu_count()} vCPU, Python {platform.python_version()}, cryptography {cryptography.__version__} "
        f"({backend.openssl_version_text()})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="per case per round")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--cpu", type=int, default=None, help="CPU to pin to (default: the first allowed)")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        cpu = args.cpu if args.cpu is not None else min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})

    raw = (VECTOR / "report.bin").read_bytes()
    vcek_der = (VECTOR / "vcek.der").read_bytes()
    chain_pem = (VECTOR / "ask_genoa.pem").read_bytes() + (VECTOR / "ark_genoa.pem").read_bytes()
    vcek, chain = load_certificate(vcek_der), load_certificates(chain_pem)
    trust = TrustStore.amd()
    at = datetime(2025, 9, 12, tzinfo=UTC)
    cached = VerifyOptions(cache=ChainCache())
    uncached = VerifyOptions(cache=None)

    report = AttestationReport.from_bytes(raw)
    signature = encode_dss_signature(report.signature_r, report.signature_s)
    key = vcek.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    algorithm = ec.ECDSA(hashes.SHA384())
    verified = verify_report(raw, vcek, chain, trust, at=at, options=cached)
    policy = AttestationPolicy(
        measurements=(report.measurement,),
        minimum_tcb=None,
        minimum_firmware="1.55",
        products=(verified.product,),
        max_vmpl=0,
    )

    def fresh_objects() -> None:
        verify_report(raw, load_certificate(vcek_der), load_certificates(chain_pem), trust, at=at, options=cached)

    cases: list[tuple[str, Callable[[], object]]] = [
        ("ECDSA P-384 verify alone (floor)", lambda: key.verify(signature, raw[:SIGNED_LEN], algorithm)),
        ("verify_report, cached chain", lambda: verify_report(raw, vcek, chain, trust, at=at, options=cached)),
        ("verify_report, cached chain, certs parsed per call", fresh_objects),
        (
            "verify_report, uncached (3x RSA-4096 PSS + ECDSA)",
            lambda: verify_report(raw, vcek, chain, trust, at=at, options=uncached),
        ),
        ("validate (policy only)", lambda: validate(verified, policy)),
    ]
    rates = measure(cases, args.seconds, args.rounds)
    floor_us = 1e6 / rates[cases[0][0]]
    table = Table(title="SEV-SNP report verification, one core (median of interleaved rounds)")
    table.add_column("case")
    table.add_column("ops/s", justify="right")
    table.add_column("µs/op", justify="right")
    table.add_column("µs over the ECDSA floor", justify="right")
    for name, _ in cases:
        us = 1e6 / rates[name]
        extra = f"{us - floor_us:,.0f}" if name != cases[0][0] and "validate" not in name else ""
        table.add_row(name, f"{rates[name]:,.0f}", f"{us:,.1f}", extra)
    console = Console()
    console.print(table)
    console.print(f"machine: {machine()}")


if __name__ == "__main__":
    main()
