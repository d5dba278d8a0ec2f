"""cvmotion platform / kds CLI: create, show, report (verified by `cvmotion attest verify`), set-tcb, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography import x509

from cvmotion.abi.snp import AttestationReport, Product, SigningKey
from cvmotion.cli.main import main
from cvmotion.firmware.certs import amd_extensions_of
from cvmotion.firmware.vendor import Vendor


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def host(emulated_vendor: Vendor, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    data = tmp_path / "host"
    code, out, _ = _run(
        capsys, "platform", "create", "--data-dir", str(data), "--vendor-dir", str(emulated_vendor.root)
    )
    assert code == 0
    assert "emulated" in out
    return data


def test_show_json(host: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "platform", "show", "--data-dir", str(host), "--json", "--kds-url", "http://kds:1/")
    assert code == 0
    doc = json.loads(out)
    assert doc["emulated"] is True
    assert doc["product"] == "Genoa"
    assert len(bytes.fromhex(doc["chip_id"])) == 64
    assert doc["reported_tcb"]["snp"] == 25
    assert doc["vcek_url"].startswith(f"http://kds:1/vcek/v1/Genoa/{doc['chip_id']}?blSPL=10&")
    code, out, _ = _run(capsys, "platform", "show", "--data-dir", str(host))
    assert code == 0
    assert "EMULATED" in out


def test_report_verifies_with_the_emulated_anchor(
    host: Path, emulated_vendor: Vendor, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report, vcek, chain = tmp_path / "r.bin", tmp_path / "vcek.der", tmp_path / "chain.pem"
    code, out, err = _run(
        capsys, "platform", "report", "--data-dir", str(host), "--report-data", "c0ffee",
        "--out", str(report), "--vcek-out", str(vcek), "--chain-out", str(chain),
    )  # fmt: skip
    assert code == 0, err
    assert "EMULATED" in out
    parsed = AttestationReport.from_bytes(report.read_bytes())
    assert parsed.report_data == bytes.fromhex("c0ffee").ljust(64, b"\0")
    assert amd_extensions_of(x509.load_der_x509_certificate(vcek.read_bytes())).hwid == parsed.chip_id
    anchor = emulated_vendor.root / "Genoa" / "ark.pem"
    args = ["attest", "verify", "--report", str(report), "--vcek", str(vcek), "--chain", str(chain), "--json"]
    code, out, _ = _run(capsys, *args, "--trust-anchor", str(anchor))
    assert code == 0
    assert json.loads(out)["platform"] == "emulated"
    code, out, _ = _run(capsys, *args)  # without the emulated ARK as an anchor: not trusted
    assert code == 2
    assert json.loads(out)["valid"] is False


def test_set_tcb_changes_the_vcek(host: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def vcek_after_report() -> x509.Certificate:
        out = tmp_path / "v.der"
        assert main(["platform", "report", "--data-dir", str(host), "--report-data", "00",
                     "--out", str(tmp_path / "r.bin"), "--vcek-out", str(out)]) == 0  # fmt: skip
        return x509.load_der_x509_certificate(out.read_bytes())

    before = vcek_after_report()
    code, out, _ = _run(capsys, "platform", "set-tcb", "--data-dir", str(host), "--snp", "26", "--commit")
    assert code == 0
    assert "snp=26" in out
    after = vcek_after_report()
    assert amd_extensions_of(after).tcb.snp == 26
    assert after.public_key() != before.public_key()
    code, _, err = _run(capsys, "platform", "set-tcb", "--data-dir", str(host), "--snp", "25")
    assert code == 3
    assert "BAD_SVN" in err


def test_load_vlek_and_report(host: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(capsys, "platform", "load-vlek", "--data-dir", str(host), "--csp-id", "csp.example")[0] == 0
    report, vlek = tmp_path / "r.bin", tmp_path / "vlek.der"
    code, _, err = _run(
        capsys, "platform", "report", "--data-dir", str(host), "--report-data", "01", "--key", "vlek",
        "--out", str(report), "--vcek-out", str(vlek),
    )  # fmt: skip
    assert code == 0, err
    assert AttestationReport.from_bytes(report.read_bytes()).key_info.signing_key is SigningKey.VLEK
    assert amd_extensions_of(x509.load_der_x509_certificate(vlek.read_bytes())).csp_id == "csp.example"


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["platform", "show", "--data-dir", "{tmp}/none"], 1, "does not exist"),
        (["platform", "report", "--data-dir", "{host}", "--report-data", "xyz"], 1, "not hexadecimal"),
        (["platform", "report", "--data-dir", "{host}", "--report-data", "00" * 65], 1, "at most 64"),
        (["platform", "report", "--data-dir", "{host}", "--report-data", "00", "--vmpl", "4"], 1, "0..3"),
        (["platform", "create", "--data-dir", "{host}"], 1, "already holds a chip"),
        (["platform", "create", "--data-dir", "{tmp}/x", "--product", "Rome"], 1, "unknown SEV-SNP product"),
        (["platform", "set-tcb", "--data-dir", "{host}"], 1, "at least one"),
        (["platform", "set-tcb", "--data-dir", "{host}", "--bl", "300"], 1, "0..255"),
        (["platform", "set-tcb", "--data-dir", "{host}", "--fmc", "1"], 1, "Turin"),
        (["platform", "report", "--data-dir", "{host}", "--report-data", "00", "--key", "vlek"], 3, "INVALID_KEY"),
        (["kds", "serve", "--listen", "nonsense"], 1, "HOST:PORT"),
        (["platform", "frobnicate"], 1, "invalid choice"),
    ],
    ids=["no-chip", "bad-hex", "too-long", "vmpl", "exists", "product", "no-tcb", "spl-range", "fmc-milan",
         "no-vlek", "listen", "verb"],
)  # fmt: skip
def test_errors_are_one_line_with_exit_codes(
    host: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], code: int, message: str
) -> None:
    argv = [a.format(tmp=tmp_path, host=host) for a in argv]
    try:
        got = main(argv)
    except SystemExit as exc:  # argparse usage errors exit directly with our usage code
        got = int(exc.code or 0)
    _, err = capsys.readouterr()
    assert got == code
    assert message in err
    assert "Traceback" not in err


def test_kds_fetch(host: Path, emulated_vendor: Vendor, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cvmotion.firmware.kds import Kds
    from cvmotion.firmware.kds_http import KdsServer

    doc = json.loads(_run(capsys, "platform", "show", "--data-dir", str(host), "--json")[1])
    tcb = doc["reported_tcb"]
    out = tmp_path / "vcek.der"
    with KdsServer(Kds(emulated_vendor)) as server:
        code, _, err = _run(
            capsys, "kds", "fetch", "--kds-url", server.url, "--product", "Genoa", "--hwid", doc["hwid"],
            "--bl", str(tcb["boot_loader"]), "--tee", str(tcb["tee"]), "--snp", str(tcb["snp"]),
            "--ucode", str(tcb["microcode"]), "--out", str(out),
        )  # fmt: skip
        assert code == 0, err
        assert amd_extensions_of(x509.load_der_x509_certificate(out.read_bytes())).product is Product.GENOA
        code, _, err = _run(
            capsys, "kds", "fetch", "--kds-url", server.url, "--product", "Genoa", "--hwid", "00" * 64,
            "--bl", "1", "--tee", "0", "--snp", "1", "--ucode", "1", "--out", str(out),
        )  # fmt: skip
        assert code == 3
        assert "HTTP 404" in err


def test_kds_serve_process(emulated_vendor: Vendor) -> None:
    """`cvmotion kds serve` as a real process: it announces a connectable URL, serves, and stops on SIGTERM."""
    import selectors
    import signal
    import subprocess
    import sys

    import httpx

    proc = subprocess.Popen(
        [sys.executable, "-m", "cvmotion", "kds", "serve", "--vendor-dir", str(emulated_vendor.root),
         "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            assert sel.select(timeout=30), "kds serve did not announce itself within 30 s"
        line = proc.stdout.readline()
        assert "EMULATED" in line
        url = line.split(" on ")[-1].strip()
        response = httpx.get(f"{url}/vcek/v1/Genoa/cert_chain", timeout=10)
        assert response.status_code == 200
        assert response.content == emulated_vendor.cert_chain_pem(Product.GENOA)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    # uvicorn shuts down gracefully, then re-raises the captured SIGTERM (a daemon's conventional exit).
    assert proc.returncode in (0, -signal.SIGTERM)
    assert "Traceback" not in err
