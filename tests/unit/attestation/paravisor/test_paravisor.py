"""attestation.paravisor: attests through real guest messages, keeps its state in guest memory, and renews
the token after the guest context moved to another chip (the same VMPCK0 sequence continues there)."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import jwt
import pytest

from cvmotion.abi.snp import AttestationReport
from cvmotion.abi.wire import BundleType
from cvmotion.attestation.paravisor import SECRETS_GPA, STATE_GPA, Paravisor
from cvmotion.firmware.device import GuestHandle, SecureProcessor
from cvmotion.firmware.launch import PAGE_SIZE, PageType
from cvmotion.firmware.vendor import Vendor
from cvmotion.vmm.memory import GuestMemory

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "protocol"))
from mig_harness import MIGRATABLE_POLICY, FakeHardware, new_sp  # noqa: E402


class Host:
    """A ParavisorHost over a real SP and guest memory; records what it published."""

    def __init__(self, sp: SecureProcessor, handle: GuestHandle, memory: GuestMemory) -> None:
        self.sp, self.handle, self.memory = sp, handle, memory
        self.published: list[bytes] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.relayed = 0

    def read_guest(self, gpa: int, length: int) -> bytes:
        return self.memory.read(gpa, length)

    def write_guest(self, gpa: int, data: bytes) -> None:
        self.memory.write(gpa, data)

    def relay_guest_request(self, message: bytes) -> bytes:
        self.relayed += 1
        return self.sp.guest_request(self.handle, message)

    def endorsements(self) -> bytes | None:
        return self.sp.get_ext_certs().pem()

    def publish_token(self, token: bytes) -> None:
        self.published.append(token)

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        self.events.append((kind, data))


def fake_attest(report: bytes, chain: bytes | None, runtime: bytes) -> str:
    """What the service would check first: the report binds SHA-256(runtime data); then a token."""
    import hashlib

    r = AttestationReport.from_bytes(report)
    assert r.report_data == hashlib.sha256(runtime).digest() + bytes(32)
    assert chain
    assert b"BEGIN CERTIFICATE" in chain
    claims = {"jti": os.urandom(8).hex(), "x-ms-sevsnpvm-chipid": r.chip_id.hex(), "x-cvmotion-platform": "emulated",
              "exp": 2_000_000_000}  # fmt: skip
    return jwt.encode(claims, "k" * 32, algorithm="HS256")


def launch(sp: SecureProcessor) -> tuple[GuestHandle, GuestMemory]:
    memory = GuestMemory(16 << 20)
    handle = sp.launch_start(MIGRATABLE_POLICY)
    sp.launch_update(handle, 0x100000, PageType.NORMAL, b"guest".ljust(PAGE_SIZE, b"\0"))
    sp.launch_update(handle, SECRETS_GPA, PageType.SECRETS, memory.view(SECRETS_GPA, PAGE_SIZE))
    sp.launch_finish(handle, host_data=bytes(32))
    sp.activate(handle)
    return handle, memory


@pytest.fixture
def sp(emulated_vendor: Vendor, tmp_path: Path) -> SecureProcessor:
    return new_sp(emulated_vendor, tmp_path / "a")


def test_boot_attests_and_keeps_state_in_guest_memory(sp: SecureProcessor) -> None:
    handle, memory = launch(sp)
    host = Host(sp, handle, memory)
    first = Paravisor(host, "vm", fake_attest).boot()
    assert host.published[-1] == first.token.encode()
    assert first.chip_id == sp.get_id().hex()
    assert memory.read(STATE_GPA, 8) == b"CVMPARA1"
    # A second paravisor over the same memory (a restarted VM process) continues the VMPCK0 sequence.
    second = Paravisor(host, "vm", fake_attest).attest("refresh")
    assert second.jti != first.jti
    assert host.relayed == 2
    assert host.events[0][0] == "Attested"


def test_renewal_after_the_context_moved_to_another_chip(emulated_vendor: Vendor, tmp_path: Path) -> None:
    src = new_sp(emulated_vendor, tmp_path / "a")
    dst = new_sp(emulated_vendor, tmp_path / "b")
    handle, memory = launch(src)
    paravisor = Paravisor(Host(src, handle, memory), "vm", fake_attest, release_key=lambda token: b"K" * 32)
    before = paravisor.boot()
    # Move the guest: firmware export/import of the context; guest memory travels with it.
    mig_src, mig_dst = src.migration, dst.migration
    sid = random.Random(3).randbytes(16)
    hw_src, hw_dst = FakeHardware(memory), FakeHardware(GuestMemory(16 << 20))
    k_f = mig_src.ma_export_prepare(handle, sid)
    ref = mig_dst.import_prepare(sid, hw_dst)
    mig_dst.ma_import_install_forward_key(ref, k_f)
    mig_src.ma_export_install_backward_key(handle, mig_dst.ma_import_generate_backward_key(ref))
    mig_src.export_start(handle, hw_src)
    bundles = [mig_src.export_immutable(handle, 0)]
    pages = [g for gpa, n in memory.populated_ranges() for g in range(gpa >> 12, (gpa + n) >> 12)]
    out = bytearray(2 << 20)
    for i in range(0, len(pages), 256):
        n = mig_src.export_memory(handle, 0, pages[i : i + 256], memoryview(out))
        bundles.append(bytes(out[:n]))
    hw_src.paused = True
    mig_src.export_pause(handle)
    for kind in (BundleType.VCPU_STATE, BundleType.DEVICE_STATE, BundleType.MUTABLE_STATE):
        bundles.append(mig_src.export_state(handle, 0, kind))
    bundles.append(mig_src.export_start_token(handle, 0))
    for b in bundles:
        mig_dst.import_bundle(ref, b)
    new_handle = mig_dst.import_activate(ref)

    dest_host = Host(dst, new_handle, hw_dst.memory)
    after = Paravisor(dest_host, "vm", fake_attest, release_key=lambda token: b"K" * 32).after_migration(0.0)
    assert after.chip_id == dst.get_id().hex() != before.chip_id
    kind, event = dest_host.events[-1]
    assert kind == "PostMigrationAttestation"
    assert event["old_chip_id"] == before.chip_id
    assert event["new_chip_id"] == after.chip_id
    assert event["old_token_id"] == before.jti
    assert event["new_token_id"] == after.jti
    assert event["data_key_unchanged"] is True
    assert json.dumps(event)  # serialisable for the event log
