"""Cross-layer contract: evidence minted by the emulated AMD-SP (cvmotion.firmware) verifies once its ARK is an
emulated anchor — one call — and is refused with AMD's pins alone. (Tests may import firmware; the verifier may not.)"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from cvmotion.abi.guest_msg import GuestChannel, ReportRsp
from cvmotion.abi.snp import Product, SigningKey
from cvmotion.attestation.evidence import load_certificate, load_certificates
from cvmotion.attestation.policy import AttestationPolicy
from cvmotion.attestation.trust import PlatformKind, TrustStore
from cvmotion.attestation.validate import validate
from cvmotion.attestation.verify import verify_report
from cvmotion.errors import VerificationError

firmware = pytest.importorskip("cvmotion.firmware.device")


@pytest.fixture(scope="module")
def emulated_evidence(emulated_vendor, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from cvmotion.firmware.chip import Chip
    from cvmotion.firmware.kds import Kds
    from cvmotion.firmware.keys import SeededRandom
    from cvmotion.firmware.launch import PAGE_SIZE, PageType

    chip = Chip.create(Path(tmp_path_factory.mktemp("attest-host")), emulated_vendor, Product.GENOA, 424242)
    sp = firmware.SecureProcessor(chip, endorsements=Kds(emulated_vendor), rng=SeededRandom(chip.chip_id, "sp"))
    handle = sp.launch_start(0x30000)
    sp.launch_update(handle, 0, PageType.NORMAL, b"attest".ljust(PAGE_SIZE, b"\0"))
    secrets = bytearray(PAGE_SIZE)
    sp.launch_update(handle, PAGE_SIZE, PageType.SECRETS, secrets)
    sp.launch_finish(handle, host_data=bytes([0x44]) * 32)
    sp.activate(handle)
    channel = GuestChannel(bytes(secrets[0x20:0x40]))
    rsp = ReportRsp.from_bytes(channel.open_response(sp.guest_request(handle, channel.report_request(b"\x42" * 64))))
    certs = sp.get_ext_certs()
    return rsp.report, load_certificate(certs.endorsement_der), load_certificates(certs.chain_pem)


def test_emulated_evidence_needs_its_ark_as_an_anchor(emulated_evidence) -> None:  # type: ignore[no-untyped-def]
    report, vcek, chain = emulated_evidence
    now = datetime.now(UTC)
    with pytest.raises(VerificationError, match="ARK CN='ARK-Genoa' .* is not a trusted root"):
        verify_report(report, vcek, chain, TrustStore.amd(), at=now)
    ark = next(c for c in chain if c.subject == c.issuer)
    verified = verify_report(report, vcek, chain, TrustStore.amd().with_anchor(ark), at=now)
    assert (verified.platform, verified.product, verified.signing_key) == (
        PlatformKind.EMULATED,
        Product.GENOA,
        SigningKey.VCEK,
    )
    assert verified.report.report_data == b"\x42" * 64
    assert verified.report.host_data == bytes([0x44]) * 32
    assert validate(verified, AttestationPolicy(platforms=(PlatformKind.AMD_SEV_SNP,))) == [
        "platform emulated is not allowed (amd-sev-snp)"
    ]
