"""agent identity: the MA is a measured guest context; its offline measurement matches what reports say."""

from __future__ import annotations

from agent_harness import Host

from cvmotion.abi.snp import AttestationReport
from cvmotion.agent.identity import (
    MA_POLICY,
    MA_VERSION,
    MigrationAgentIdentity,
    expected_ma_measurement,
    ma_image,
    measured_files,
)
from cvmotion.firmware.launch import PAGE_SIZE


def test_image_is_deterministic_page_aligned_and_names_the_sources() -> None:
    image = ma_image()
    assert image == ma_image()
    assert len(image) % PAGE_SIZE == 0
    assert image.startswith(MA_VERSION.encode() + b"\0")
    for name in (b"agent/identity.py\0", b"agent/ratls.py\0", b"agent/session.py\0", b"agent/policy.py\0"):
        assert name in image
    # Not only the agent: every module of code the MA runs (the SP it drives, the formats, the verifier).
    for name in (b"firmware/migration.py\0", b"abi/wire.py\0", b"attestation/verify.py\0", b"errors.py\0"):
        assert name in image
    assert not any(str(path).startswith(("host/", "migration/", "cli/")) for path in measured_files())


def test_offline_measurement_is_what_the_sp_reports(src: Host) -> None:
    identity = src.identity
    assert identity.measurement == expected_ma_measurement()
    info = src.sp.guest_info(identity.handle)
    assert info.policy == MA_POLICY
    assert not MA_POLICY.migrate_ma
    assert not MA_POLICY.debug
    report, pem = identity.attestation_report(b"\x5a" * 64)
    parsed = AttestationReport.from_bytes(report)
    assert parsed.measurement == expected_ma_measurement()
    assert parsed.report_data == b"\x5a" * 64
    assert parsed.chip_id == src.chip_id
    assert parsed.vmpl == 0
    assert pem.count(b"BEGIN CERTIFICATE") == 3  # VCEK, ASK, ARK


def test_another_build_has_another_measurement(src: Host) -> None:
    other = MigrationAgentIdentity.launch(src.sp, image=b"a different migration agent build")
    try:
        assert other.measurement == expected_ma_measurement(b"a different migration agent build")
        assert other.measurement != expected_ma_measurement()
        assert other.handle != src.identity.handle
    finally:
        other.close()


def test_reports_keep_working_across_requests(src: Host) -> None:
    first, _ = src.identity.attestation_report(b"\x01" * 64)
    second, _ = src.identity.attestation_report(b"\x02" * 64)
    assert AttestationReport.from_bytes(first).report_data != AttestationReport.from_bytes(second).report_data
