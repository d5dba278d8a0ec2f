"""Token renewal after a move between two emulated chips, and endorsement fetching from a (real HTTP) KDS."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from pathlib import Path

import pytest
from attsvc_support import FakeClock, Guest, body, emulated_trust, launch, make_service, new_sp

from cvmotion.attestation.relying_party import RelyingParty
from cvmotion.attestation.service_error import ServiceError
from cvmotion.attestation.token import StaticJwks
from cvmotion.errors import TokenError
from cvmotion.firmware.context import GuestContext
from cvmotion.firmware.kds import Kds
from cvmotion.firmware.kds_http import KdsServer
from cvmotion.firmware.vendor import Vendor


def _move(guest: Guest, destination_dir: Path, vendor: Vendor) -> Guest:
    """What issue 4's import path does inside the SPs: the context leaves chip A and is adopted by chip B
    (here at a higher SNP TCB); the guest keeps its VMPCK channel and sequence numbers."""
    destination = new_sp(vendor, destination_dir)
    current = destination.platform_status().current_tcb
    destination.update_tcb(dataclasses.replace(current, snp=current.snp + 1), commit=True)
    raw = guest.sp._guests[guest.handle].to_bytes()  # inside the emulated hardware domain
    guest.sp.decommission(guest.handle)
    handle = destination._adopt_context(GuestContext.from_bytes(raw))
    return Guest(destination, handle, guest.channel)


def test_renewal_after_migration(emulated_vendor: Vendor, tmp_path: Path) -> None:
    clock = FakeClock()
    service = make_service(tmp_path / "svc", emulated_trust(emulated_vendor), clock, lifetime_s=3600)
    rp = RelyingParty(StaticJwks(service.jwks()), issuer="http://attest.test", clock=clock)
    guest = launch(new_sp(emulated_vendor, tmp_path / "host-a"))
    runtime = b"kvstore boot"

    def attest(g: Guest) -> str:
        report = g.report(hashlib.sha256(runtime).digest())
        return asyncio.run(service.attest(body(report, g.chain_pem(), runtime))).token

    old_token = attest(guest)
    old = rp.verify(old_token).claims
    clock.advance(minutes=20)
    moved = _move(guest, tmp_path / "host-b", emulated_vendor)
    new_token = attest(moved)
    new = rp.verify(new_token).claims
    assert new["x-ms-sevsnpvm-chipid"] != old["x-ms-sevsnpvm-chipid"]
    assert new["x-ms-sevsnpvm-chipid"] == moved.sp.get_id().hex()
    assert new["x-ms-sevsnpvm-snpfw-svn"] == old["x-ms-sevsnpvm-snpfw-svn"] + 1
    assert new["x-ms-sevsnpvm-reportedtcb"] != old["x-ms-sevsnpvm-reportedtcb"]
    for same in ("x-ms-sevsnpvm-launchmeasurement", "x-ms-sevsnpvm-hostdata", "x-ms-sevsnpvm-reportid"):
        assert new[same] == old[same], same  # the same guest, launched once
    # Both tokens are valid at once: relying parties see no gap.  The old one lapses at its own expiry.
    clock.advance(minutes=39)
    rp.verify(old_token)
    rp.verify(new_token)
    clock.advance(minutes=2)
    with pytest.raises(TokenError, match="expired"):
        rp.verify(old_token)
    assert rp.verify(new_token).claims["jti"] == new["jti"]
    with pytest.raises(Exception, match="no guest"):  # the source chip no longer has the guest
        guest.report(b"x")


@pytest.fixture(scope="module")
def kds_url(emulated_vendor: Vendor) -> object:
    with KdsServer(Kds(emulated_vendor)) as server:
        yield server.url


def test_kds_fetch_and_cache(emulated_vendor: Vendor, tmp_path: Path, kds_url: str) -> None:
    clock = FakeClock()
    service = make_service(tmp_path / "svc", emulated_trust(emulated_vendor), clock, kds_url=kds_url)
    guest = launch(new_sp(emulated_vendor, tmp_path / "host"))
    for _ in range(3):
        result = asyncio.run(service.attest(body(guest.report(b"k"), None)))
        assert result.claims["x-ms-sevsnpvm-chipid"] == guest.sp.get_id().hex()
    assert service.kds is not None
    assert service.kds.fetches == 2  # one cert_chain, one VCEK; then the caches answer
    other = launch(new_sp(emulated_vendor, tmp_path / "host-2"))
    asyncio.run(service.attest(body(other.report(b"k"), None)))
    assert service.kds.fetches == 3  # a new chip: only its VCEK


def test_kds_failures(emulated_vendor: Vendor, tmp_path: Path, kds_url: str) -> None:
    clock = FakeClock()
    guest = launch(new_sp(emulated_vendor, tmp_path / "host"))
    report = bytearray(guest.report(b"k"))
    report[0x1A0] ^= 0xFF  # a CHIP_ID the vendor never made: the KDS has no VCEK for it
    service = make_service(tmp_path / "svc", emulated_trust(emulated_vendor), clock, kds_url=kds_url)
    with pytest.raises(ServiceError) as info:
        asyncio.run(service.attest(body(bytes(report), None)))
    assert (info.value.status, info.value.kind) == (400, "endorsement_not_found")
    down = make_service(tmp_path / "svc2", emulated_trust(emulated_vendor), clock, kds_url="http://127.0.0.1:9")
    with pytest.raises(ServiceError) as info:
        asyncio.run(down.attest(body(guest.report(b"k"), None)))
    assert (info.value.status, info.value.kind) == (502, "kds_unavailable")
