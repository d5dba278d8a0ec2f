"""firmware.guest_request: reports through real guest messages; sequence numbers, replay and tamper fail closed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from fw_helpers import PROBE_POLICY, Guest, launch, new_sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cvmotion.abi.guest_msg import (
    GuestChannel,
    GuestMsgHeader,
    MsgType,
    ReportRsp,
    open_guest_message,
    seal_guest_message,
)
from cvmotion.abi.snp import AttestationReport, PlatformInfo, Product, SigningKey, TcbVersion
from cvmotion.errors import FirmwareError, FirmwareStatus, IntegrityError, MalformedStructure
from cvmotion.firmware.device import SecureProcessor
from cvmotion.firmware.vendor import Vendor


def _report(guest: Guest, report_data: bytes = b"\x42" * 64, *, vmpl: int = 0, key_sel: int = 0) -> ReportRsp:
    channel = guest.channel()
    rsp = guest.sp.guest_request(guest.handle, channel.report_request(report_data, vmpl=vmpl, key_sel=key_sel))
    return ReportRsp.from_bytes(channel.open_response(rsp))


def _verify(report: AttestationReport, cert_der: bytes) -> None:
    key = x509.load_der_x509_certificate(cert_der).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    sig = encode_dss_signature(report.signature_r, report.signature_s)
    key.verify(sig, report.to_bytes()[:0x2A0], ec.ECDSA(hashes.SHA384()))


def test_report_fields_are_truthful(sp: SecureProcessor) -> None:
    guest = launch(sp, host_data=b"\x07" * 32)
    rsp = _report(guest, b"\x42" * 64, vmpl=2)
    assert rsp.status == 0
    report = AttestationReport.from_bytes(rsp.report)
    status = sp.platform_status()
    info = sp.guest_info(guest.handle)
    assert report.version == 3
    assert report.report_data == b"\x42" * 64
    assert report.vmpl == 2
    assert report.policy.to_u64() == PROBE_POLICY
    assert report.measurement == info.measurement
    assert report.host_data == b"\x07" * 32
    assert report.chip_id == sp.get_id()
    assert report.tcb(report.reported_tcb, Product.GENOA) == status.reported_tcb
    assert report.tcb(report.current_tcb, Product.GENOA) == status.current_tcb
    assert report.tcb(report.committed_tcb, Product.GENOA) == status.committed_tcb
    assert report.tcb(report.launch_tcb, Product.GENOA) == status.current_tcb
    assert (report.current_major, report.current_minor, report.current_build) == (1, 55, 43)
    assert report.cpuid_product is Product.GENOA
    assert report.platform_info & PlatformInfo.SMT_EN
    assert report.key_info.signing_key is SigningKey.VCEK
    assert report.report_id_ma == b"\xff" * 32
    assert any(report.report_id)
    assert report.id_key_digest == bytes(48)
    assert report.signature_algo == 1
    _verify(report, sp.get_ext_certs().endorsement_der)


def test_report_id_is_per_guest_and_stable(sp: SecureProcessor) -> None:
    a, b = launch(sp), launch(sp)
    first = AttestationReport.from_bytes(_report(a).report)
    second = AttestationReport.from_bytes(_report(a).report)
    other = AttestationReport.from_bytes(_report(b).report)
    assert first.report_id == second.report_id != other.report_id


def test_tampered_report_fails_signature(guest: Guest) -> None:
    report = AttestationReport.from_bytes(_report(guest).report)
    forged = dataclasses.replace(report, report_data=b"\x43" * 64)
    with pytest.raises(InvalidSignature):
        _verify(forged, guest.sp.get_ext_certs().endorsement_der)


def test_v5_chip_fills_mitigation_vectors(emulated_vendor: Vendor, tmp_path: Path) -> None:
    sp = new_sp(emulated_vendor, tmp_path / "h", report_version=5, mit_vector=0x3)
    report = AttestationReport.from_bytes(_report(launch(sp)).report)
    assert report.version == 5
    assert report.launch_mit_vector == report.current_mit_vector == 0x3
    _verify(report, sp.get_ext_certs().endorsement_der)


def test_v2_chip_has_no_cpuid(emulated_vendor: Vendor, tmp_path: Path) -> None:
    sp = new_sp(emulated_vendor, tmp_path / "h", report_version=2)
    report = AttestationReport.from_bytes(_report(launch(sp)).report)
    assert report.version == 2
    assert (report.cpuid_fam_id, report.cpuid_mod_id) == (0, 0)


def test_turin_report(emulated_vendor: Vendor, tmp_path: Path) -> None:
    sp = new_sp(emulated_vendor, tmp_path / "h", Product.TURIN)
    report = AttestationReport.from_bytes(_report(launch(sp)).report)
    assert report.cpuid_product is Product.TURIN
    assert not any(report.chip_id[8:])
    assert report.tcb(report.reported_tcb, Product.TURIN) == sp.platform_status().reported_tcb
    _verify(report, sp.get_ext_certs().endorsement_der)


def test_vmpl_below_requester_is_invalid_param(guest: Guest) -> None:
    channel = guest.channel(vmpck_id=1)  # a VMPL1 requester may not ask for a VMPL0 report
    rsp = ReportRsp.from_bytes(
        channel.open_response(guest.sp.guest_request(guest.handle, channel.report_request(bytes(64), vmpl=0)))
    )
    assert rsp.status == 0x16
    assert rsp.report == b""
    assert _report(guest, vmpl=3).status == 0  # VMPCK0's own sequence numbers are independent
    bad = guest.channel(vmpck_id=2)
    answer = guest.sp.guest_request(guest.handle, bad.report_request(bytes(64), vmpl=4))
    assert ReportRsp.from_bytes(bad.open_response(answer)).status == 0x16


def _rejected(sp: SecureProcessor, guest: Guest, msg: bytes) -> None:
    with pytest.raises(FirmwareError) as info:
        sp.guest_request(guest.handle, msg)
    assert info.value.status is FirmwareStatus.INVALID_PARAM
    assert str(info.value).endswith("guest message rejected")  # opaque: the same words for every failure


def test_replay_is_rejected_and_does_not_burn_the_channel(guest: Guest) -> None:
    sp = guest.sp
    channel = guest.channel()
    request = channel.report_request(b"\1" * 64)
    response = sp.guest_request(guest.handle, request)
    channel.open_response(response)
    _rejected(sp, guest, request)  # the same bytes again: replay
    assert channel.last_seqno == 2
    answer = sp.guest_request(guest.handle, channel.report_request(bytes(64)))
    assert ReportRsp.from_bytes(channel.open_response(answer)).status == 0


@pytest.mark.parametrize(
    ("offset", "what"),
    [(0x00, "authtag"), (0x08, "seqno"), (0x30, "algo"), (0x3E, "msg-size"), (0x60, "ciphertext"), (0x10, "tag-pad")],
)
def test_tampered_request_is_rejected(guest: Guest, offset: int, what: str) -> None:
    sp = guest.sp
    channel = guest.channel()
    request = bytearray(channel.report_request(b"\2" * 64))
    request[offset] ^= 0x01
    _rejected(sp, guest, bytes(request))
    # The context is unchanged: the genuine request still goes through.
    request[offset] ^= 0x01
    assert ReportRsp.from_bytes(channel.open_response(sp.guest_request(guest.handle, bytes(request)))).status == 0


def test_out_of_order_and_wrong_key_are_rejected(guest: Guest) -> None:
    header = GuestMsgHeader(authtag=bytes(32), msg_seqno=3, msg_type=MsgType.REPORT_REQ, msg_size=0)
    payload = bytes(0x60)
    _rejected(guest.sp, guest, seal_guest_message(guest.vmpck0, header, payload))  # skips seqno 1
    header = dataclasses.replace(header, msg_seqno=1)
    _rejected(guest.sp, guest, seal_guest_message(b"\0" * 32, header, payload))  # not the VMPCK
    vmpck1 = bytes(guest.secrets[0x40:0x60])
    _rejected(guest.sp, guest, seal_guest_message(vmpck1, header, payload))  # VMPCK1 while header says 0
    _rejected(guest.sp, guest, b"\0" * 0x20)  # not even a header


def test_response_is_sealed_with_next_seqno(guest: Guest) -> None:
    channel = guest.channel()
    response = guest.sp.guest_request(guest.handle, channel.report_request(bytes(64)))
    header, payload = open_guest_message(guest.vmpck0, response)
    assert header.msg_seqno == 2
    assert header.msg_type is MsgType.REPORT_RSP
    assert ReportRsp.from_bytes(payload).status == 0


def test_guest_channel_disables_itself_on_a_bad_response(guest: Guest) -> None:
    channel = guest.channel()
    response = bytearray(guest.sp.guest_request(guest.handle, channel.report_request(bytes(64))))
    response[0x70] ^= 0x80
    with pytest.raises(IntegrityError):
        channel.open_response(bytes(response))
    assert channel.disabled
    with pytest.raises(IntegrityError):
        channel.report_request(bytes(64))


def test_guest_channel_rejects_a_replayed_response(guest: Guest) -> None:
    channel = guest.channel()
    old = guest.sp.guest_request(guest.handle, channel.report_request(bytes(64)))
    channel.open_response(old)
    guest.sp.guest_request(guest.handle, channel.report_request(bytes(64)))  # host withholds the new answer
    with pytest.raises(IntegrityError):
        channel.open_response(old)  # and replays the old one


def test_key_sel_and_vlek(emulated_vendor: Vendor, tmp_path: Path) -> None:
    sp = new_sp(emulated_vendor, tmp_path / "h", Product.MILAN)
    guest = launch(sp)
    assert _report(guest, key_sel=2).status == 0x27  # VLEK asked for, none loaded: INVALID_KEY
    chip_id = sp.get_id()
    tcb = sp.platform_status().reported_tcb
    issue = emulated_vendor.issue_vlek(Product.MILAN, "csp.example", tcb, chip_id)
    sp.vlek_load(issue.hashstick, issue.cert.public_bytes(serialization.Encoding.DER))
    for key_sel, expected in ((0, SigningKey.VLEK), (1, SigningKey.VCEK), (2, SigningKey.VLEK)):
        report = AttestationReport.from_bytes(_report(guest, key_sel=key_sel).report)
        assert report.key_info.signing_key is expected
        _verify(report, sp.get_ext_certs(expected).endorsement_der)
    assert b"SEV-VLEK" not in sp.get_ext_certs(SigningKey.VCEK).pem()
    # A restarted host reloads the VLEK it was given.
    again = SecureProcessor.open(tmp_path / "h")
    assert again.platform_status().vlek_en
    # A firmware update to another TCB unloads it (it is certified for one TCB).
    again.update_tcb(TcbVersion(boot_loader=tcb.boot_loader, tee=tcb.tee, snp=tcb.snp + 1, microcode=tcb.microcode))
    assert not again.platform_status().vlek_en


def test_vlek_for_another_chip_is_refused(emulated_vendor: Vendor, tmp_path: Path) -> None:
    a = new_sp(emulated_vendor, tmp_path / "a", Product.MILAN)
    b = new_sp(emulated_vendor, tmp_path / "b", Product.MILAN)
    tcb = a.platform_status().reported_tcb
    issue = emulated_vendor.issue_vlek(Product.MILAN, "csp.example", tcb, a.get_id())
    der = issue.cert.public_bytes(serialization.Encoding.DER)
    with pytest.raises(FirmwareError) as info:
        b.vlek_load(issue.hashstick, der)
    assert info.value.status is FirmwareStatus.BAD_SIGNATURE
    tampered = bytearray(issue.hashstick)
    tampered[0x10] ^= 1  # claim another TCB
    with pytest.raises(FirmwareError) as info:
        a.vlek_load(bytes(tampered), der)
    assert info.value.status is FirmwareStatus.BAD_SIGNATURE


def test_host_visible_outputs_never_carry_guest_keys(guest: Guest) -> None:
    """Canary: nothing the host gets back from the SP contains the VMPCKs or the VMRK."""
    sp = guest.sp
    secrets = [bytes(guest.secrets[0x20 + 0x20 * i : 0x40 + 0x20 * i]) for i in range(4)]
    ctx = sp._guests[guest.handle]  # test-only peek at the SP's own state
    secrets.append(ctx.vmrk)
    channel = guest.channel()
    seen = [
        sp.guest_request(guest.handle, channel.report_request(bytes(64))),
        repr(sp.guest_info(guest.handle)).encode(),
        repr(sp.platform_status()).encode(),
        sp.get_ext_certs().pem(),
    ]
    for blob in seen:
        for secret in secrets:
            assert secret not in blob
    public = [name for name in dir(sp) if not name.startswith("_")]
    assert not [name for name in public if any(word in name for word in ("vmpck", "vmrk", "secret", "private"))]


def test_guest_channel_checks_its_inputs() -> None:
    with pytest.raises(Exception, match="32-byte VMPCK"):
        GuestChannel(b"short")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=0x200))
def test_arbitrary_bytes_fail_closed(guest: Guest, junk: bytes) -> None:
    """Junk from the host: the SP answers only the opaque refusal; the guest side only IntegrityError."""
    with pytest.raises(FirmwareError) as info:
        guest.sp.guest_request(guest.handle, junk)
    assert info.value.status is FirmwareStatus.INVALID_PARAM
    with pytest.raises(IntegrityError):
        open_guest_message(guest.vmpck0, junk)


def test_channel_only_sends_requests() -> None:
    channel = GuestChannel(bytes(32))
    with pytest.raises(MalformedStructure, match="REPORT_RSP is not a request"):
        channel.request(MsgType.REPORT_RSP, b"")
