"""firmware layer: SNP_GUEST_REQUEST: open a guest message, answer MSG_REPORT_REQ / MSG_KEY_REQ, seal the reply.

```
 guest (paravisor)            untrusted host                 SP (this module)
  seal(VMPCKn, seq=s+1) ──► relays opaque bytes ──► open, check seq == s+1, VMPCK n enabled
                                                   answer; seal(VMPCKn, seq=s+2); context seq := s+2
  open(seq=s+2)        ◄── relays opaque bytes ◄──
```
Failure policy (decision, see docs/design.md): a request that does not authenticate, names a wrong
sequence number (replay, reorder) or is malformed before authentication is rejected with ONE opaque
``FirmwareError(INVALID_PARAM)``; the context is left unchanged (no sequence number is consumed, no
VMPCK is disabled), so a host that injects garbage cannot burn the guest's channel or learn anything.
The guest side (``GuestChannel``) disables its VMPCK after a failure, as Linux does, because only it
can reuse an IV.  A request that authenticates but asks for something invalid gets a sealed response
whose STATUS says so (INVALID_PARAM 0x16, INVALID_KEY 0x27), as the SNP ABI specifies.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from cvmotion.abi.guest_msg import (
    HEADER_SIZE,
    MAX_SEQNO,
    GuestFieldSelect,
    GuestMsgHeader,
    KeyReq,
    KeyRsp,
    MsgType,
    ReportReq,
    ReportRsp,
    RootKey,
    open_guest_message,
    seal_guest_message,
)
from cvmotion.abi.snp import ECDSA_P384_SHA384, AttestationReport, KeyInfo, SigningKey, TcbVersion
from cvmotion.errors import AbiError, FirmwareError, FirmwareStatus, IntegrityError
from cvmotion.firmware.chip import Chip
from cvmotion.firmware.context import GuestContext, GuestState
from cvmotion.firmware.keys import derive_vcek, hkdf_sha384

__all__ = ["Signers", "build_report", "derive_guest_key", "handle_guest_request", "sign_report"]

STATUS_SUCCESS = 0x00
STATUS_INVALID_PARAM = 0x16
STATUS_INVALID_KEY = 0x27  # "key selection invalid" (MSG_REPORT_RSP / MSG_KEY_RSP STATUS)


@dataclass(frozen=True, slots=True)
class Signers:
    """The endorsement keys the SP may sign with: the VCEK always, the VLEK once loaded."""

    vcek: ec.EllipticCurvePrivateKey = field(repr=False)
    vlek: ec.EllipticCurvePrivateKey | None = field(default=None, repr=False)

    def select(self, key_sel: int) -> tuple[SigningKey, ec.EllipticCurvePrivateKey] | None:
        """KEY_SEL 0: the VLEK if loaded, else the VCEK; 1: VCEK; 2: VLEK (None when none is loaded)."""
        if key_sel == 1 or (key_sel == 0 and self.vlek is None):
            return SigningKey.VCEK, self.vcek
        if self.vlek is None:
            return None
        return SigningKey.VLEK, self.vlek


def _rejected() -> FirmwareError:
    return FirmwareError(FirmwareStatus.INVALID_PARAM, "guest message rejected")


def handle_guest_request(ctx: GuestContext, chip: Chip, signers: Signers, request: bytes) -> bytes:
    """Answer one SNP guest message for ``ctx``; returns the sealed response message."""
    if ctx.state is not GuestState.RUNNING:
        raise FirmwareError(FirmwareStatus.INVALID_GUEST_STATE, f"guest is in {ctx.state.name}, not RUNNING")
    try:
        vmpck_id = GuestMsgHeader.from_bytes(request[:HEADER_SIZE]).msg_vmpck
    except AbiError:
        raise _rejected() from None
    key = ctx.vmpcks[vmpck_id]
    last = ctx.msg_seqnos[vmpck_id]
    if last + 2 > MAX_SEQNO:
        raise FirmwareError(FirmwareStatus.AEAD_OFLOW, f"VMPCK{vmpck_id} sequence numbers are exhausted")
    try:
        header, payload = open_guest_message(key, request)
    except IntegrityError:
        raise _rejected() from None
    if header.msg_seqno != last + 1 or header.msg_version != 1:
        raise _rejected()
    # The VMPCK a message used tells the SP the requester's VMPL (VMPCKn belongs to VMPLn).
    if header.msg_type is MsgType.REPORT_REQ:
        response = _report_response(ctx, chip, signers, payload, requester_vmpl=vmpck_id)
    elif header.msg_type is MsgType.KEY_REQ:
        response = _key_response(ctx, chip, signers, payload, requester_vmpl=vmpck_id)
    else:
        raise FirmwareError(FirmwareStatus.INVALID_PARAM, f"message type {header.msg_type.name} is not supported")
    ctx.msg_seqnos[vmpck_id] = last + 2
    reply = GuestMsgHeader(
        authtag=bytes(32),
        msg_seqno=last + 2,
        msg_type=MsgType(header.msg_type + 1),
        msg_size=0,
        msg_vmpck=vmpck_id,
    )
    return seal_guest_message(key, reply, response)


# -- MSG_REPORT_REQ --------------------------------------------------------------------------------


def _report_response(ctx: GuestContext, chip: Chip, signers: Signers, payload: bytes, *, requester_vmpl: int) -> bytes:
    try:
        req = ReportReq.from_bytes(payload)
    except AbiError:
        return ReportRsp(STATUS_INVALID_PARAM, b"").to_bytes()
    if not requester_vmpl <= req.vmpl <= 3:
        return ReportRsp(STATUS_INVALID_PARAM, b"").to_bytes()
    chosen = signers.select(req.key_sel)
    if chosen is None:
        return ReportRsp(STATUS_INVALID_KEY, b"").to_bytes()
    kind, key = chosen
    report = build_report(ctx, chip, report_data=req.report_data, vmpl=req.vmpl, signing_key=kind)
    return ReportRsp(STATUS_SUCCESS, sign_report(report, key).to_bytes()).to_bytes()


def build_report(
    ctx: GuestContext, chip: Chip, *, report_data: bytes, vmpl: int, signing_key: SigningKey
) -> AttestationReport:
    """The unsigned ATTESTATION_REPORT for ``ctx`` on ``chip``: every field from the SP's own state."""
    layout = chip.product.tcb_layout
    version = chip.report_version
    ident = ctx.identity
    return AttestationReport(
        version=version,
        guest_svn=ident.guest_svn,
        policy=ctx.policy,
        family_id=ident.family_id,
        image_id=ident.image_id,
        vmpl=vmpl,
        signature_algo=ECDSA_P384_SHA384,
        current_tcb=chip.current_tcb.to_u64(layout),
        platform_info=chip.platform_info,
        key_info=KeyInfo(author_key_en=ident.author_key_en, signing_key=signing_key),
        report_data=report_data,
        measurement=ctx.launch_digest,
        host_data=ctx.host_data,
        id_key_digest=ident.id_key_digest,
        author_key_digest=ident.author_key_digest,
        report_id=ctx.report_id,
        report_id_ma=ctx.report_id_ma,
        reported_tcb=chip.reported_tcb.to_u64(layout),
        chip_id=chip.chip_id,
        committed_tcb=chip.committed_tcb.to_u64(layout),
        current_build=chip.firmware.build,
        current_minor=chip.firmware.minor,
        current_major=chip.firmware.major,
        committed_build=chip.committed_firmware.build,
        committed_minor=chip.committed_firmware.minor,
        committed_major=chip.committed_firmware.major,
        launch_tcb=ctx.launch_tcb.to_u64(layout),
        cpuid_fam_id=chip.cpuid.family if version >= 3 else 0,
        cpuid_mod_id=chip.cpuid.model if version >= 3 else 0,
        cpuid_step=chip.cpuid.stepping if version >= 3 else 0,
        launch_mit_vector=ctx.launch_mit_vector if version >= 5 else 0,
        current_mit_vector=chip.mit_vector if version >= 5 else 0,
    )


def sign_report(report: AttestationReport, key: ec.EllipticCurvePrivateKey) -> AttestationReport:
    """ECDSA P-384 / SHA-384 over report bytes 0x000-0x29F (SNP ABI, ATTESTATION_REPORT SIGNATURE)."""
    r, s = decode_dss_signature(key.sign(report.signed_bytes, ec.ECDSA(hashes.SHA384())))
    return report.replace(signature_r=r, signature_s=s)


# -- MSG_KEY_REQ -----------------------------------------------------------------------------------

_KEY_INFO = struct.Struct("<24sBIQQ16s16s48sIQQ")


def _key_response(ctx: GuestContext, chip: Chip, signers: Signers, payload: bytes, *, requester_vmpl: int) -> bytes:
    failed = KeyRsp(STATUS_INVALID_PARAM, bytes(32)).to_bytes()
    try:
        req = KeyReq.from_bytes(payload)
        requested_tcb = TcbVersion.from_u64(req.tcb_version, chip.product.tcb_layout)
    except AbiError:
        return failed
    fields = req.guest_field_select
    if not requester_vmpl <= req.vmpl <= 3:
        return failed
    # SNP ABI, MSG_KEY_REQ: GUEST_SVN may not exceed the launch SVN, TCB_VERSION not the committed TCB.
    if fields & GuestFieldSelect.GUEST_SVN and req.guest_svn > ctx.identity.guest_svn:
        return failed
    if fields & GuestFieldSelect.TCB_VERSION and not chip.committed_tcb.dominates(requested_tcb):
        return failed
    if req.root_key is RootKey.VMRK:
        root = ctx.vmrk
    else:
        chosen = signers.select(req.key_sel)
        if chosen is None:
            return KeyRsp(STATUS_INVALID_KEY, bytes(32)).to_bytes()
        kind, key = chosen
        if kind is SigningKey.VCEK and fields & GuestFieldSelect.TCB_VERSION:
            # Rooted in the VCEK of the requested (older or equal) TCB, as the real SP derives it.
            key = derive_vcek(chip.chip_secret, chip.product, requested_tcb)
        root = key.private_numbers().private_value.to_bytes(48, "big")
    return KeyRsp(STATUS_SUCCESS, derive_guest_key(root, ctx, req)).to_bytes()


def derive_guest_key(root: bytes, ctx: GuestContext, req: KeyReq) -> bytes:
    """HKDF-SHA384(root, info) where ``info`` encodes the VMPL, the field mask and each selected field."""
    fields = req.guest_field_select

    def pick(flag: GuestFieldSelect, value: bytes | int, zero: bytes | int) -> bytes | int:
        return value if fields & flag else zero

    info = _KEY_INFO.pack(
        b"cvmotion MSG_KEY_REQ v1\0",
        int(req.root_key),
        req.vmpl,
        int(fields),
        pick(GuestFieldSelect.GUEST_POLICY, ctx.policy.to_u64(), 0),
        pick(GuestFieldSelect.IMAGE_ID, ctx.identity.image_id, bytes(16)),
        pick(GuestFieldSelect.FAMILY_ID, ctx.identity.family_id, bytes(16)),
        pick(GuestFieldSelect.MEASUREMENT, ctx.launch_digest, bytes(48)),
        pick(GuestFieldSelect.GUEST_SVN, req.guest_svn, 0),
        pick(GuestFieldSelect.TCB_VERSION, req.tcb_version, 0),
        pick(GuestFieldSelect.LAUNCH_MIT_VECTOR, ctx.launch_mit_vector, 0),
    )
    return hkdf_sha384(root, info, 32)
