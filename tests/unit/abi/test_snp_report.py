"""abi.snp: real reports round-trip byte for byte; reserved ranges and versions are checked."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cvmotion.abi.snp import REPORT_SIZE, AttestationReport, Product, SigningKey, TcbLayout, TcbVersion
from cvmotion.errors import AbiError, MalformedStructure, ReservedNotZero, UnsupportedVersion

REAL = [("snp/milan-v2/attestation.bin", 2), ("snp/genoa-v5/report.bin", 5)]


@pytest.mark.parametrize(("path", "version"), REAL, ids=["milan-v2", "genoa-v5"])
def test_real_report_round_trips(vectors_dir: Path, path: str, version: int) -> None:
    raw = (vectors_dir / path).read_bytes()
    report = AttestationReport.from_bytes(raw)
    assert report.version == version
    assert report.to_bytes() == raw
    assert report.key_info.signing_key is SigningKey.VCEK
    assert report.signature_algo == 1


def test_genoa_fields(vectors_dir: Path) -> None:
    report = AttestationReport.from_bytes((vectors_dir / "snp/genoa-v5/report.bin").read_bytes())
    assert report.cpuid_product is Product.GENOA
    assert report.tcb(report.reported_tcb, Product.GENOA) == TcbVersion(boot_loader=10, snp=25, microcode=84)
    assert report.launch_mit_vector == report.current_mit_vector == 1


@pytest.mark.parametrize(
    ("offset", "error"),
    [
        (0x04C, ReservedNotZero),  # reserved after KEY_INFO
        (0x18B, ReservedNotZero),  # reserved after CPUID (v3+)
        (0x1EB, ReservedNotZero),  # reserved byte after CURRENT_MAJOR
        (0x20F, ReservedNotZero),  # reserved v5 tail of the signed area
        (0x2A0 + 48, ReservedNotZero),  # upper bytes of SIGNATURE.R
        (0x400, ReservedNotZero),  # signature reserved area
    ],
)
def test_reserved_bytes_rejected(vectors_dir: Path, offset: int, error: type[AbiError]) -> None:
    raw = bytearray((vectors_dir / "snp/genoa-v5/report.bin").read_bytes())
    raw[offset] ^= 0x01
    with pytest.raises(error, match="reserved bytes"):
        AttestationReport.from_bytes(bytes(raw))


def test_v2_has_no_cpuid(vectors_dir: Path) -> None:
    raw = bytearray((vectors_dir / "snp/milan-v2/attestation.bin").read_bytes())
    raw[0x188] = 0x19
    with pytest.raises(ReservedNotZero, match="0x188"):
        AttestationReport.from_bytes(bytes(raw))


@pytest.mark.parametrize("size", [0, REPORT_SIZE - 1, REPORT_SIZE + 1])
def test_wrong_length(size: int) -> None:
    with pytest.raises(MalformedStructure, match="expected 0x4a0 bytes"):
        AttestationReport.from_bytes(bytes(size))


@pytest.mark.parametrize("version", [0, 1, 6, 0xFFFFFFFF])
def test_unknown_versions(vectors_dir: Path, version: int) -> None:
    raw = bytearray((vectors_dir / "snp/genoa-v5/report.bin").read_bytes())
    raw[0:4] = version.to_bytes(4, "little")
    with pytest.raises(UnsupportedVersion):
        AttestationReport.from_bytes(bytes(raw))


@given(st.binary(min_size=REPORT_SIZE, max_size=REPORT_SIZE))
def test_arbitrary_bytes_raise_only_abi_errors(data: bytes) -> None:
    try:
        report = AttestationReport.from_bytes(data)
    except AbiError:
        return
    assert report.to_bytes() == data


@given(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255), st.integers(0, 255), st.integers(0, 255))
def test_tcb_round_trip_turin(fmc: int, bl: int, tee: int, snp: int, ucode: int) -> None:
    tcb = TcbVersion(boot_loader=bl, tee=tee, snp=snp, microcode=ucode, fmc=fmc)
    assert TcbVersion.from_u64(tcb.to_u64(TcbLayout.TURIN), TcbLayout.TURIN) == tcb


def test_tcb_examples_from_spec() -> None:
    assert TcbVersion.from_u64(0x4405000000000002, TcbLayout.PRE_TURIN) == TcbVersion(2, 0, 5, 0x44)
    assert TcbVersion.from_u64(0x4700000002000100, TcbLayout.TURIN) == TcbVersion(1, 0, 2, 0x47, fmc=0)
