"""CLI contract, in process: ``cvmotion attest token``, ``cvmotion attestation verify-token``, ``rotate-key``,
``key-release create-key`` — exit codes 0 / 1 / 2 / 5 and the JSON shapes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from attsvc_support import FakeClock, emulated_trust, make_service

from cvmotion.attestation.http_common import ServerThread, listen_socket
from cvmotion.attestation.service_http import create_app
from cvmotion.cli.main import main
from cvmotion.firmware.vendor import Vendor

GENOA = Path(__file__).resolve().parents[3] / "vectors" / "snp" / "genoa-v5"
MILAN = Path(__file__).resolve().parents[3] / "vectors" / "snp" / "milan-v2"


@pytest.fixture(scope="module")
def service_url(emulated_vendor: Vendor, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    service = make_service(
        tmp_path_factory.mktemp("cli-svc"), emulated_trust(emulated_vendor), FakeClock(), allow_evaluation_time=True
    )
    sock, url = listen_socket("127.0.0.1", 0)
    service.issuer = url
    with ServerThread(create_app(service), sock, url):
        yield url


def _genoa_args(url: str, *extra: str) -> list[str]:
    return [
        "attest", "token", "--report", str(GENOA / "report.bin"), "--vcek", str(GENOA / "vcek.der"),
        "--chain", str(GENOA / "ask_genoa.pem"), "--chain", str(GENOA / "ark_genoa.pem"), "--service", url, *extra,
    ]  # fmt: skip


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_attest_token_then_verify_token(capsys: pytest.CaptureFixture[str], service_url: str) -> None:
    code, out, _ = _run(capsys, _genoa_args(service_url, "--at", "2025-09-12T00:00:00Z", "--json"))
    assert code == 0
    doc = json.loads(out)
    assert doc["claims"]["x-cvmotion-platform"] == "amd-sev-snp"
    assert doc["header"]["alg"] == "RS256"
    token = doc["token"]
    # The token was evaluated at an explicit time: a relying party refuses it unless told otherwise.
    code, _, err = _run(capsys, ["attestation", "verify-token", token, "--jwks", f"{service_url}/certs"])
    assert code == 2
    assert "evaluated at an explicit time" in err
    argv = ["attestation", "verify-token", token, "--jwks", f"{service_url}/certs", "--allow-evaluation-time"]
    code, out, _ = _run(capsys, [*argv, "--json"])
    assert code == 0
    assert json.loads(out)["claims"]["x-ms-sevsnpvm-snpfw-svn"] == 25
    code, out, _ = _run(capsys, argv)
    assert code == 0
    assert out.startswith("VALID token")
    tampered = token[:-6] + ("A" * 6 if not token.endswith("A" * 6) else "B" * 6)
    code, _, err = _run(capsys, [*argv[:2], tampered, *argv[3:]])
    assert code == 2
    assert "INVALID" in err


def test_attest_token_exit_codes(capsys: pytest.CaptureFixture[str], service_url: str, tmp_path: Path) -> None:
    code, out, _ = _run(capsys, _genoa_args(service_url, "--at", "2025-08-01T00:00:00Z", "--json"))
    assert code == 2  # outside the VCEK's validity: verification failed
    assert "not yet valid" in json.loads(out)["error"]
    milan = [
        "attest", "token", "--report", str(MILAN / "attestation.bin"), "--vcek", str(MILAN / "vcek.der"),
        "--chain", str(MILAN / "ask_ark_milan.pem"), "--service", service_url,
    ]  # fmt: skip
    code, _, err = _run(capsys, milan)
    assert code == 5  # a debug guest under the default policy
    assert "POLICY.DEBUG" in err
    code, _, err = _run(capsys, [*milan[:3], str(tmp_path / "missing.bin"), *milan[4:]])
    assert code == 1
    assert "cannot read --report" in err
    code, _, _ = _run(capsys, [*milan, "--tenant", "nobody"])
    assert code == 1  # 404 unknown tenant is a usage problem
    code, _, err = _run(capsys, _genoa_args("http://127.0.0.1:9"))
    assert code == 3
    assert "attestation refused" in err


def test_rotate_key_and_create_key(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = _run(capsys, ["attestation", "rotate-key", "--data-dir", str(tmp_path)])
    assert code == 1
    assert "start the service once" in err
    from datetime import timedelta

    from cvmotion.attestation.keys import SigningKeyStore

    first = SigningKeyStore.open(tmp_path / "signing-keys", overlap=timedelta(hours=9)).active.kid
    code, out, _ = _run(capsys, ["attestation", "rotate-key", "--data-dir", str(tmp_path)])
    assert code == 0
    assert f"{first} stays in the JWKS for 32400 s" in out
    policy = tmp_path / "release.json"
    doc: dict[str, Any] = {
        "version": "1.0.0",
        "anyOf": [{"authority": "http://a", "allOf": [{"claim": "x-ms-attestation-type", "equals": "sevsnpvm"}]}],
    }
    policy.write_text(json.dumps(doc))
    argv = ["attestation", "key-release", "create-key", "--data-dir", str(tmp_path / "kr"), "--name", "k1"]
    code, out, _ = _run(capsys, [*argv, "--policy", str(policy), "--secret-hex", "00ff"])
    assert code == 0
    assert "2 bytes" in out
    assert (tmp_path / "kr" / "keys" / "k1.json").stat().st_mode & 0o777 == 0o600
    code, _, err = _run(capsys, [*argv, "--policy", str(policy)])
    assert code == 1
    assert "already exists" in err
    policy.write_text('{"version": "1.0.0", "anyOf": []}')
    code, _, err = _run(capsys, [*argv[:-1], "k2", "--policy", str(policy)])
    assert code == 1
    assert "non-empty list" in err
