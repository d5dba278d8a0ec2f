"""Helpers for the attestation-service tests: a fake clock, emulated guests on emulated chips, a service factory.

(Tests may import the emulated firmware to *produce* evidence; the service under test never does.)
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import count
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.serialization import Encoding
from fastapi import FastAPI

from cvmotion.abi.guest_msg import GuestChannel, ReportRsp
from cvmotion.abi.snp import Product
from cvmotion.attestation.client import AttestationClient
from cvmotion.attestation.endorsements import KdsFetcher
from cvmotion.attestation.http_common import ServerThread, listen_socket
from cvmotion.attestation.keys import SigningKeyStore
from cvmotion.attestation.policy import AttestationPolicy
from cvmotion.attestation.service import CLOCK_SKEW, AttestationService
from cvmotion.attestation.tenants import Tenant, TenantConfig, load_tenants
from cvmotion.attestation.trust import TrustStore
from cvmotion.firmware.chip import Chip
from cvmotion.firmware.device import GuestHandle, SecureProcessor
from cvmotion.firmware.kds import Kds
from cvmotion.firmware.keys import SeededRandom
from cvmotion.firmware.launch import PAGE_SIZE, PageType
from cvmotion.firmware.vendor import Vendor

PROBE_POLICY = 0x30000  # SMT allowed, reserved bit 17: no debug, no migration agent
DEBUG_POLICY = 0xB0000  # + DEBUG (bit 19)
_seeds = count(7_000_000)


class FakeClock:
    """An injectable clock that moves only when told."""

    def __init__(self, now: datetime | None = None) -> None:
        self.now = (now or datetime.now(UTC)).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def new_sp(vendor: Vendor, data_dir: Path, product: Product = Product.GENOA) -> SecureProcessor:
    chip = Chip.create(data_dir, vendor, product, next(_seeds))
    return SecureProcessor(chip, endorsements=Kds(vendor), rng=SeededRandom(chip.chip_id, "sp"))


@dataclass
class Guest:
    """A launched guest and its VMPCK0 channel (the channel tracks sequence numbers, so it moves with the guest)."""

    sp: SecureProcessor
    handle: GuestHandle
    channel: GuestChannel
    vmpl: int = 0
    reports: list[bytes] = field(default_factory=list)

    def report(self, report_data: bytes) -> bytes:
        request = self.channel.report_request(report_data.ljust(64, b"\0"), vmpl=self.vmpl)
        rsp = ReportRsp.from_bytes(self.channel.open_response(self.sp.guest_request(self.handle, request)))
        self.reports.append(rsp.report)
        return rsp.report

    def chain_pem(self) -> bytes:
        """VCEK (PEM) + ASK + ARK, as ``vcek_cert_chain`` wants it."""
        return self.sp.get_ext_certs().pem()


def launch(sp: SecureProcessor, *, policy: int = PROBE_POLICY, image: bytes = b"attsvc") -> Guest:
    handle = sp.launch_start(policy)
    sp.launch_update(handle, 0, PageType.NORMAL, image.ljust(PAGE_SIZE, b"\0"))
    secrets = bytearray(PAGE_SIZE)
    sp.launch_update(handle, PAGE_SIZE, PageType.SECRETS, secrets)
    sp.launch_finish(handle, host_data=bytes([0x5A]) * 32)
    sp.activate(handle)
    return Guest(sp, handle, GuestChannel(bytes(secrets[0x20:0x40])))


def emulated_trust(vendor: Vendor, *products: Product) -> TrustStore:
    trust = TrustStore.amd()
    for product in products or (Product.GENOA,):
        trust = trust.with_anchor(vendor.roots(product).ark.cert)
    return trust


def make_service(
    data_dir: Path,
    trust: TrustStore,
    clock: FakeClock,
    *,
    policy: AttestationPolicy | None = None,
    tenants: dict[str, TenantConfig] | None = None,
    kds_url: str | None = None,
    allow_evaluation_time: bool = False,
    rotate_after: timedelta | None = None,
    lifetime_s: int = 3600,
) -> AttestationService:
    all_tenants = load_tenants(None, policy)
    default = all_tenants["default"].config.model_copy(update={"token_lifetime_s": lifetime_s})
    all_tenants["default"] = Tenant.of("default", default)
    for name, config in (tenants or {}).items():
        all_tenants[name] = Tenant.of(name, config)
    longest = max(t.config.token_lifetime_s for t in all_tenants.values())
    keys = SigningKeyStore.open(data_dir / "signing-keys", overlap=timedelta(seconds=longest) + CLOCK_SKEW, clock=clock)
    return AttestationService(
        trust=trust,
        keys=keys,
        tenants=all_tenants,
        issuer="http://attest.test",
        clock=clock,
        kds=KdsFetcher(kds_url) if kds_url else None,
        allow_evaluation_time=allow_evaluation_time,
        rotate_after=rotate_after,
    )


@contextlib.contextmanager
def serve_app(app: FastAPI) -> Iterator[httpx.Client]:
    """``app`` on a real loopback socket (uvicorn in a thread) and an httpx client for it."""
    sock, url = listen_socket("127.0.0.1", 0)
    with ServerThread(app, sock, url), httpx.Client(base_url=url, timeout=30) as client:
        yield client


def body(report: bytes, chain_pem: bytes | None, runtime: bytes | None = None, **kw: Any) -> bytes:
    return json.dumps(AttestationClient.evidence_body(report, chain_pem, runtime, **kw)).encode()


def real_chain_pem(ev: Any) -> bytes:
    """A RealEvidence (tests/unit/attestation/conftest.py) as one PEM: VCEK, then its chain."""
    return b"".join(c.public_bytes(Encoding.PEM) for c in (ev.vcek, *ev.chain))
