"""agent pool credentials and the ``cvmotion pool`` CLI."""

from __future__ import annotations

import datetime as dt
import json
import stat
from pathlib import Path

import pytest
from agent_harness import FakeClock
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from cvmotion.abi.snp import Product
from cvmotion.agent.oids import OID_POOL_CHIP_ID, OID_POOL_MEMBERSHIP, OID_POOL_NAME, decode_octets
from cvmotion.agent.policy import MigrationPolicy
from cvmotion.agent.pool import (
    CA_KEY_FILE,
    PoolAuthority,
    create_pool_ca,
    issue_pool_credential,
    load_pool_ca,
    verify_pool_credential,
)
from cvmotion.cli.main import main
from cvmotion.errors import UsageError, VerificationError
from cvmotion.firmware.chip import Chip
from cvmotion.firmware.vendor import Vendor

CHIP = bytes(range(64))


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def test_credential_binds_chip_and_pool(pool_ca: PoolAuthority, clock: FakeClock) -> None:
    cert = issue_pool_credential(pool_ca, CHIP, "pool-a", now=clock())
    cred = verify_pool_credential(_der(cert), (pool_ca.cert,), at=clock())
    assert (cred.chip_id, cred.pool, cred.serial) == (CHIP, "pool-a", cert.serial_number)
    assert cert.subject.rfc4514_string() == f"CN={CHIP[:8].hex()},OU=pool-a,O=cvmotion host pool credential"
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [OID_POOL_MEMBERSHIP]
    raw_chip = cert.extensions.get_extension_for_oid(OID_POOL_CHIP_ID).value.value  # type: ignore[attr-defined]
    assert decode_octets(raw_chip, "chip") == CHIP
    raw_pool = cert.extensions.get_extension_for_oid(OID_POOL_NAME).value.value  # type: ignore[attr-defined]
    assert decode_octets(raw_pool, "pool") == b"pool-a"


def test_untrusted_ca_expiry_and_tampering_are_refused(
    pool_ca: PoolAuthority, clock: FakeClock, tmp_path: Path
) -> None:
    other = create_pool_ca(tmp_path / "other", now=clock())
    der = _der(issue_pool_credential(pool_ca, CHIP, "pool-a", now=clock(), days=1))
    with pytest.raises(VerificationError, match="not signed by a trusted pool CA"):
        verify_pool_credential(der, (other.cert,), at=clock())
    with pytest.raises(VerificationError, match="expired"):
        verify_pool_credential(der, (pool_ca.cert,), at=clock() + dt.timedelta(days=2))
    flipped = bytearray(der)
    flipped[len(der) // 2] ^= 1
    with pytest.raises(VerificationError):
        verify_pool_credential(bytes(flipped), (pool_ca.cert,), at=clock())
    for junk in (b"", b"junk", bytes(9000)):
        with pytest.raises(VerificationError):
            verify_pool_credential(junk, (pool_ca.cert,), at=clock())


def test_a_certificate_for_another_purpose_is_not_a_credential(pool_ca: PoolAuthority, clock: FakeClock) -> None:
    """Signed by the pool CA but without the pool-membership purpose (e.g. a TLS certificate)."""
    good = issue_pool_credential(pool_ca, CHIP, "pool-a", now=clock())
    b = (
        x509.CertificateBuilder()
        .subject_name(good.subject)
        .issuer_name(good.issuer)
        .public_key(good.public_key())  # type: ignore[arg-type]
        .serial_number(1)
        .not_valid_before(good.not_valid_before_utc)
        .not_valid_after(good.not_valid_after_utc)
    )
    for ext in good.extensions:
        value = ext.value
        if isinstance(value, x509.ExtendedKeyUsage):
            value = x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH])
        b = b.add_extension(value, ext.critical)
    wrong = b.sign(pool_ca.key, hashes.SHA384())
    with pytest.raises(VerificationError, match="pool-membership"):
        verify_pool_credential(_der(wrong), (pool_ca.cert,), at=clock())


def test_issue_validates_inputs(pool_ca: PoolAuthority, clock: FakeClock) -> None:
    with pytest.raises(UsageError, match="64 bytes"):
        issue_pool_credential(pool_ca, b"\x01" * 8, "pool-a", now=clock())
    for name in ("", "has space", "-lead", "x" * 65, "pöol"):
        with pytest.raises(UsageError, match="pool name"):
            issue_pool_credential(pool_ca, CHIP, name, now=clock())


def test_ca_persists_privately_and_is_not_overwritten(tmp_path: Path, clock: FakeClock) -> None:
    ca = create_pool_ca(tmp_path / "ca", name="ops", now=clock())
    assert stat.S_IMODE((tmp_path / "ca" / CA_KEY_FILE).stat().st_mode) == 0o600
    loaded = load_pool_ca(tmp_path / "ca")
    assert loaded.cert == ca.cert
    with pytest.raises(UsageError, match="already holds"):
        create_pool_ca(tmp_path / "ca", now=clock())
    with pytest.raises(UsageError, match="No such file"):
        load_pool_ca(tmp_path / "missing")


def test_cli_init_issue_show(tmp_path: Path, emulated_vendor: Vendor, capsys: pytest.CaptureFixture[str]) -> None:
    ca_dir, host_dir, cred = tmp_path / "ca", tmp_path / "host", tmp_path / "host.pem"
    chip = Chip.create(host_dir, emulated_vendor, Product.GENOA, 4_242_001)
    assert main(["pool", "init-ca", "--dir", str(ca_dir), "--name", "ops pool CA"]) == 0
    assert main(["pool", "init-ca", "--dir", str(ca_dir)]) == 1
    args = ["pool", "issue", "--ca-dir", str(ca_dir), "--host-data-dir", str(host_dir), "--pool", "blue"]
    assert main([*args, "--out", str(cred)]) == 0
    capsys.readouterr()
    assert main(["pool", "show", "--cred", str(cred), "--ca-dir", str(ca_dir), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["verified"] is True
    assert (shown["chip_id"], shown["pool"]) == (chip.chip_id.hex(), "blue")
    assert main(["pool", "show", "--cred", str(cred)]) == 0
    assert "verified   False" in capsys.readouterr().out
    main(["pool", "init-ca", "--dir", str(tmp_path / "other")])
    assert main(["pool", "show", "--cred", str(cred), "--ca-dir", str(tmp_path / "other")]) == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--chip-id", "zz", "--pool", "p"], "not hex"),
        (["--chip-id", "00" * 10, "--pool", "p"], "64 bytes"),
        (["--chip-id", "00" * 64, "--pool", "no spaces"], "pool name"),
        (["--host-data-dir", "/nonexistent", "--pool", "p"], "cannot read"),
    ],
    ids=["hex", "length", "pool", "host-dir"],
)
def test_cli_issue_errors_exit_1(
    tmp_path: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["pool", "init-ca", "--dir", str(tmp_path / "ca")])
    capsys.readouterr()
    assert main(["pool", "issue", "--ca-dir", str(tmp_path / "ca"), *argv, "--out", str(tmp_path / "x.pem")]) == 1
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_cli_turin_chip_id_is_padded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["pool", "init-ca", "--dir", str(tmp_path / "ca")])
    out = tmp_path / "t.pem"
    argv = ["pool", "issue", "--ca-dir", str(tmp_path / "ca"), "--chip-id", "0011223344556677", "--pool", "t"]
    assert main([*argv, "--out", str(out)]) == 0
    cert = x509.load_pem_x509_certificate(out.read_bytes())
    raw = cert.extensions.get_extension_for_oid(OID_POOL_CHIP_ID).value.value  # type: ignore[attr-defined]
    assert decode_octets(raw, "chip") == bytes.fromhex("0011223344556677") + bytes(56)


def test_cli_policy_writes_a_canonical_document(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "policy.json"
    argv = ["pool", "policy", "--allow-pool", "blue", "--allow-pool", "green", "--min-snp", "25", "--product", "Genoa"]
    assert main([*argv, "--out", str(out)]) == 0
    policy = MigrationPolicy.from_canonical(out.read_bytes())
    assert policy.allowed_pools == ("blue", "green")
    assert policy.minimum_tcb is not None
    assert policy.minimum_tcb.snp == 25
    assert f"host_data {policy.host_data().hex()}" in capsys.readouterr().out
    assert main(["pool", "policy", "--allow-pool", "x", "--ma-measurement", "abcd"]) == 1
    assert "allowed_ma_measurements" in capsys.readouterr().err
