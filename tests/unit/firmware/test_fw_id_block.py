"""LAUNCH_FINISH with an ID block: sev-snp-measure's snp-create-id-block output is accepted, tampering is not."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fw_helpers import PROBE_POLICY
from sevsnpmeasure.id_block import snp_calc_id_block

from cvmotion.abi.guest_msg import GuestChannel, ReportRsp
from cvmotion.abi.snp import AttestationReport
from cvmotion.errors import FirmwareError, FirmwareStatus
from cvmotion.firmware.device import GuestHandle, SecureProcessor
from cvmotion.firmware.id_block import IdBlock, marshal_public_key, sign_id_block
from cvmotion.firmware.launch import PAGE_SIZE, PageType

ID_KEY = ec.derive_private_key(0x1D_B10C, ec.SECP384R1())
AUTHOR_KEY = ec.derive_private_key(0xA07_4012, ec.SECP384R1())


def _launch(sp: SecureProcessor, policy: int = PROBE_POLICY) -> tuple[GuestHandle, bytearray, bytes]:
    handle = sp.launch_start(policy)
    sp.launch_update(handle, 0, PageType.NORMAL, b"id-block guest".ljust(PAGE_SIZE, b"\0"))
    secrets = bytearray(PAGE_SIZE)
    sp.launch_update(handle, PAGE_SIZE, PageType.SECRETS, secrets)
    return handle, secrets, sp.guest_info(handle).measurement


def _pem(key: ec.EllipticCurvePrivateKey, path: Path) -> str:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(path)


def _report(sp: SecureProcessor, handle: GuestHandle, secrets: bytearray) -> AttestationReport:
    sp.activate(handle)
    channel = GuestChannel(bytes(secrets[0x20:0x40]))
    rsp = ReportRsp.from_bytes(channel.open_response(sp.guest_request(handle, channel.report_request(bytes(64)))))
    return AttestationReport.from_bytes(rsp.report)


def test_sev_snp_measure_id_block_is_accepted(sp: SecureProcessor, tmp_path: Path) -> None:
    handle, secrets, digest = _launch(sp)
    out = snp_calc_id_block(digest, _pem(ID_KEY, tmp_path / "id.pem"), _pem(AUTHOR_KEY, tmp_path / "author.pem"))
    fields = dict(part.split("=", 1) for part in out.splitlines()[0].rstrip(",").split(","))
    id_block, id_auth = base64.b64decode(fields["id-block"]), base64.b64decode(fields["id-auth"])
    sp.launch_finish(handle, id_block=id_block, id_auth=id_auth, author_key_en=True)
    report = _report(sp, handle, secrets)
    assert report.id_key_digest == hashlib.sha384(marshal_public_key(ID_KEY.public_key())).digest()
    assert report.author_key_digest == hashlib.sha384(marshal_public_key(AUTHOR_KEY.public_key())).digest()
    assert base64.b64decode(out.splitlines()[1].split(": ")[1]) == report.id_key_digest  # sev-snp-measure agrees
    assert report.key_info.author_key_en


def test_ids_and_svn_reach_the_report(sp: SecureProcessor) -> None:
    handle, secrets, digest = _launch(sp)
    block = IdBlock(ld=digest, family_id=b"F" * 16, image_id=b"I" * 16, guest_svn=7, policy=PROBE_POLICY)
    sp.launch_finish(handle, id_block=block.to_bytes(), id_auth=sign_id_block(block, ID_KEY))
    report = _report(sp, handle, secrets)
    assert (report.family_id, report.image_id, report.guest_svn) == (b"F" * 16, b"I" * 16, 7)
    assert report.author_key_digest == bytes(48)
    assert not report.key_info.author_key_en


def test_wrong_digest_is_bad_measurement(sp: SecureProcessor) -> None:
    handle, _, _ = _launch(sp)
    block = IdBlock(ld=b"\1" * 48)
    with pytest.raises(FirmwareError) as info:
        sp.launch_finish(handle, id_block=block.to_bytes(), id_auth=sign_id_block(block, ID_KEY))
    assert info.value.status is FirmwareStatus.BAD_MEASUREMENT
    assert sp.guest_info(handle).state.name == "LAUNCH"  # a refused LAUNCH_FINISH changes nothing


def test_wrong_policy_is_policy_failure(sp: SecureProcessor) -> None:
    handle, _, digest = _launch(sp)
    block = IdBlock(ld=digest, policy=PROBE_POLICY | 1 << 19)
    with pytest.raises(FirmwareError) as info:
        sp.launch_finish(handle, id_block=block.to_bytes(), id_auth=sign_id_block(block, ID_KEY))
    assert info.value.status is FirmwareStatus.POLICY_FAILURE


@pytest.mark.parametrize(("offset", "what"), [(0x40, "ID_BLOCK_SIG"), (0x680, "ID_KEY_SIG"), (0x250, "ID_KEY")])
def test_tampered_auth_is_refused(sp: SecureProcessor, offset: int, what: str) -> None:
    handle, _, digest = _launch(sp)
    block = IdBlock(ld=digest)
    auth = bytearray(sign_id_block(block, ID_KEY, AUTHOR_KEY))
    auth[offset] ^= 0x01
    with pytest.raises(FirmwareError) as info:
        sp.launch_finish(handle, id_block=block.to_bytes(), id_auth=bytes(auth), author_key_en=True)
    # A flipped key bit usually leaves P-384 (INVALID_PARAM); a flipped signature bit fails verification.
    assert info.value.status in (FirmwareStatus.BAD_SIGNATURE, FirmwareStatus.INVALID_PARAM)


def test_id_block_needs_its_auth(sp: SecureProcessor) -> None:
    handle, _, digest = _launch(sp)
    with pytest.raises(FirmwareError) as info:
        sp.launch_finish(handle, id_block=IdBlock(ld=digest).to_bytes())
    assert info.value.status is FirmwareStatus.INVALID_PARAM
