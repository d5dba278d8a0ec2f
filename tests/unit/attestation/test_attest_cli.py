"""``cvmotion attest verify``: the exit-code contract (0/1/2/5) and the JSON shape, on real and synthetic evidence."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from attest_pki import AT, TCB, Pki, chip_id_for, make_report, p384
from cryptography.hazmat.primitives.serialization import Encoding

from cvmotion.abi.snp import Product
from cvmotion.cli.attest import TRUST_ANCHORS_ENV
from cvmotion.cli.main import main

SNP = Path(__file__).resolve().parents[2] / "vectors" / "snp"
MILAN = ["--report", str(SNP / "milan-v2/attestation.bin"), "--vcek", str(SNP / "milan-v2/vcek.der")]
MILAN += ["--chain", str(SNP / "milan-v2/ask_ark_milan.pem"), "--at", "2025-01-01T00:00:00Z"]
GENOA = ["--report", str(SNP / "genoa-v5/report.bin"), "--vcek", str(SNP / "genoa-v5/vcek.der")]
GENOA += ["--chain", str(SNP / "genoa-v5/ask_genoa.pem"), "--chain", str(SNP / "genoa-v5/ark_genoa.pem")]
GENOA_AT = ["--at", "2025-09-12T00:00:00Z"]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any] | None, str, str]:
    code = main(["attest", "verify", *args])
    out, err = capsys.readouterr()
    doc = json.loads(out) if "--json" in args else None
    assert "Traceback" not in out + err
    return code, doc, out, err


def with_report(tmp_path: Path, args: list[str], mutate: Any) -> list[str]:
    raw = bytearray((SNP / "genoa-v5/report.bin").read_bytes())
    mutate(raw)
    path = tmp_path / "report.bin"
    path.write_bytes(bytes(raw))
    out = list(args)
    out[out.index("--report") + 1] = str(path)
    return out


def test_milan_valid_human(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, out, err = run(capsys, *MILAN)
    assert code == 0
    assert "VALID" in out
    assert "ARK-Milan" in out
    assert err == ""


def test_genoa_valid_json_shape(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc, _, _ = run(capsys, *GENOA, *GENOA_AT, "--json")
    assert code == 0
    assert doc is not None
    assert doc["valid"] is True
    assert (doc["product"], doc["version"], doc["signing_key"], doc["platform"]) == ("Genoa", 5, "VCEK", "amd-sev-snp")
    assert doc["errors"] == doc["policy_violations"] == []
    assert doc["measurement"].startswith("c57729018b0a6fb9")
    assert doc["chip_id"].startswith("d2421d976f95ce0b")
    assert doc["reported_tcb"] == {"raw": "0x541900000000000a", "boot_loader": 10, "tee": 0, "snp": 25, "microcode": 84}
    assert doc["report_data"].startswith("8100555af0ad8e75")
    assert doc["host_data"] == "00" * 32
    assert doc["policy"]["raw"] == "0x0000000000030000"
    assert (doc["policy"]["debug"], doc["policy"]["migrate_ma"]) == (False, False)
    assert doc["vmpl"] == 0
    assert doc["verified_at"] == "2025-09-12T00:00:00+00:00"


@pytest.mark.parametrize("at", ["2025-08-01T00:00:00Z", "2025-08-07T19:21:40+02:00", "2032-08-08"])
def test_outside_validity_is_exit_2(capsys: pytest.CaptureFixture[str], at: str) -> None:
    code, doc, _, _ = run(capsys, *GENOA, "--at", at, "--json")
    assert code == 2
    assert doc is not None
    assert doc["valid"] is False
    assert "VCEK" in doc["errors"][0]
    assert doc["platform"] is None


def test_at_offsets_and_naive_times(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, *GENOA, "--at", "2025-08-07T19:21:42+02:00")[0] == 0  # 17:21:42Z, a second after issue
    assert run(capsys, *GENOA, "--at", "2025-09-12T00:00:00")[0] == 0  # no offset: UTC


def test_tampered_report_is_exit_2_and_never_valid(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    args = with_report(tmp_path, GENOA, lambda b: b.__setitem__(0x90, b[0x90] ^ 1))
    code, doc, _, _ = run(capsys, *args, *GENOA_AT, "--json")
    assert code == 2
    assert doc is not None
    assert doc["valid"] is False
    assert doc["errors"] == ["report signature does not verify with the VCEK key (ECDSA P-384 SHA-384)"]
    code, _, out, err = run(capsys, *args, *GENOA_AT)
    assert code == 2
    assert "VALID" not in out
    assert "verification failed" in err


def test_policy_failure_is_exit_5_with_every_violation(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"allow_debug": False, "products": ["Genoa"], "minimum_tcb": {"snp": 6}}))
    code, doc, _, _ = run(capsys, *MILAN, "--policy", str(policy), "--json")
    assert code == 5
    assert doc is not None
    assert doc["valid"] is False
    assert doc["platform"] == "amd-sev-snp"  # the evidence itself verified
    assert len(doc["policy_violations"]) == 5  # debug, product, 3 x TCB
    assert doc["errors"] == doc["policy_violations"]
    assert doc["policy"]["debug"] is True
    code, _, _, err = run(capsys, *MILAN, "--policy", str(policy))
    assert code == 5
    assert "POLICY.DEBUG" in err


def test_verification_failure_wins_over_policy(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text('{"products": ["Turin"]}')
    code, doc, _, _ = run(capsys, *GENOA, "--at", "2020-01-01T00:00:00Z", "--policy", str(policy), "--json")
    assert code == 2
    assert doc is not None
    assert doc["policy_violations"] == []


def _write(tmp_path: Path, name: str, data: bytes) -> str:
    (tmp_path / name).write_bytes(data)
    return str(tmp_path / name)


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing-report", "cannot read --report"),
        ("chain-not-pem", "not a PEM or DER"),
        ("vcek-not-der", "not a PEM or DER"),
        ("truncated", "expected 0x4a0 bytes, got 0x49f"),
        ("oversized", "expected 0x4a0 bytes, got 0x4a1"),
        ("unknown-version", "VERSION 6 is not supported"),
        ("reserved-bytes", "reserved bytes 0x4c..0x4f must be zero"),
        ("bad-at", "is not an ISO 8601 time"),
        ("bad-product", "--product: unknown SEV-SNP product name 'Rome'"),
        ("bad-policy", "invalid attestation policy: vmpl"),
        ("policy-not-json", "not valid JSON"),
        ("bad-anchor", "trust anchor: not a PEM or DER"),
    ],
)
def test_bad_input_is_exit_1(capsys: pytest.CaptureFixture[str], tmp_path: Path, case: str, match: str) -> None:
    args = [*GENOA, *GENOA_AT]
    raw = (SNP / "genoa-v5/report.bin").read_bytes()
    if case == "missing-report":
        args[1] = str(tmp_path / "nope.bin")
    elif case == "chain-not-pem":
        args[args.index("--chain") + 1] = _write(tmp_path, "chain.pem", b"hello")
    elif case == "vcek-not-der":
        args[3] = _write(tmp_path, "vcek.der", bytes(64))
    elif case in ("truncated", "oversized", "unknown-version", "reserved-bytes"):
        data = {
            "truncated": raw[:-1],
            "oversized": raw + b"\0",
            "unknown-version": (6).to_bytes(4, "little") + raw[4:],
            "reserved-bytes": raw[:0x4C] + b"\x01" + raw[0x4D:],
        }[case]
        args[1] = _write(tmp_path, "r.bin", data)
    elif case == "bad-at":
        args[-1] = "next tuesday"
    elif case == "bad-product":
        args += ["--product", "Rome"]
    elif case == "bad-policy":
        args += ["--policy", _write(tmp_path, "p.json", b'{"vmpl": 9}')]
    elif case == "policy-not-json":
        args += ["--policy", _write(tmp_path, "p.json", b"vmpl: 9")]
    elif case == "bad-anchor":
        args += ["--trust-anchor", _write(tmp_path, "a.pem", b"-----BEGIN CERTIFICATE-----\nxx\n")]
    code, doc, _, _ = run(capsys, *args, "--json")
    assert code == 1
    assert doc is not None
    assert doc["valid"] is False
    assert len(doc["errors"]) == 1
    assert match in doc["errors"][0], doc["errors"]
    code, _, out, err = run(capsys, *args)
    assert code == 1
    assert out == ""
    assert match in err


def test_product_pin(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, *GENOA, *GENOA_AT, "--product", "genoa")[0] == 0
    code, doc, _, _ = run(capsys, *GENOA, *GENOA_AT, "--product", "Milan", "--json")
    assert code == 2
    assert doc is not None
    assert "product mismatch" in doc["errors"][0]


def test_missing_required_option_is_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["attest", "verify", "--report", "x"])
    assert info.value.code == 1
    capsys.readouterr()


@pytest.fixture
def emulated_files(tmp_path: Path) -> dict[str, str]:
    """Synthetic Turin evidence under a self-made ARK-Turin, written to files."""
    pki = Pki(Product.TURIN)
    key = p384(9)
    files = {
        "report": _write(tmp_path, "report.bin", make_report(Product.TURIN, key, TCB[Product.TURIN])),
        "vcek": _write(
            tmp_path,
            "vcek.pem",
            pki.vcek(key, TCB[Product.TURIN], chip_id_for(Product.TURIN)).public_bytes(Encoding.PEM),
        ),
        "chain": _write(tmp_path, "ask.pem", pki.ask.public_bytes(Encoding.PEM)),
        "ark": _write(tmp_path, "ark.pem", pki.ark.public_bytes(Encoding.PEM)),
    }
    return files


def test_emulated_anchor_flag_and_env(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, emulated_files: dict[str, str]
) -> None:
    f = emulated_files
    base = ["--report", f["report"], "--vcek", f["vcek"], "--chain", f["chain"], "--at", AT.isoformat(), "--json"]
    monkeypatch.delenv(TRUST_ANCHORS_ENV, raising=False)
    code, doc, _, _ = run(capsys, *base, "--chain", f["ark"])
    assert code == 2
    assert doc is not None
    assert "is not a trusted root" in doc["errors"][0]
    code, doc, _, _ = run(capsys, *base, "--trust-anchor", f["ark"])
    assert code == 0
    assert doc is not None
    assert (doc["platform"], doc["product"], doc["version"]) == ("emulated", "Turin", 5)
    assert doc["reported_tcb"]["fmc"] == 1
    monkeypatch.setenv(TRUST_ANCHORS_ENV, os.pathsep.join(["", f["ark"]]))
    code, doc, _, _ = run(capsys, *base)
    assert code == 0
    assert doc is not None
    assert doc["platform"] == "emulated"


def test_subprocess_prints_one_json_object_and_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\0" * 10)
    for args, want in (([*GENOA, *GENOA_AT], 0), (["--report", str(bad), *GENOA[2:], *GENOA_AT], 1)):
        proc = subprocess.run(
            [sys.executable, "-m", "cvmotion", "attest", "verify", *args, "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == want, proc.stderr
        assert "Traceback" not in proc.stderr
        assert json.loads(proc.stdout)["valid"] is (want == 0)
