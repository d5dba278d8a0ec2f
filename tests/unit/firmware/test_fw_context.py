"""firmware.context: the guest context serializes to its documented layout and refuses damaged bytes."""

from __future__ import annotations

import pytest
from fw_helpers import Guest

from cvmotion.errors import AbiError, MalformedStructure, ReservedNotZero, UnsupportedVersion
from cvmotion.firmware.context import CONTEXT_SIZE, ContextFlag, GuestContext, GuestState, OpState


def _ctx(guest: Guest) -> GuestContext:
    return guest.sp._guests[guest.handle]  # test-only: the SP-internal context


def test_round_trip(guest: Guest) -> None:
    ctx = _ctx(guest)
    raw = ctx.to_bytes()
    assert len(raw) == CONTEXT_SIZE
    again = GuestContext.from_bytes(raw)
    assert again == ctx
    assert again.to_bytes() == raw
    assert again.state is GuestState.RUNNING
    assert again.op_state is OpState.RUNNABLE
    assert again.flags & ContextFlag.ACTIVATED


def test_layout_offsets(guest: Guest) -> None:
    channel = guest.channel()
    channel.open_response(guest.sp.guest_request(guest.handle, channel.report_request(bytes(64))))
    ctx = _ctx(guest)
    raw = ctx.to_bytes()
    assert raw[0:8] == b"CVMGCTX\0"
    assert int.from_bytes(raw[0x18:0x20], "little") == ctx.policy.to_u64()
    assert raw[0x40:0x70] == ctx.launch_digest
    assert raw[0x110:0x130] == ctx.report_id
    assert raw[0x130:0x150] == b"\xff" * 32  # REPORT_ID_MA: no migration agent
    assert int.from_bytes(raw[0x150:0x158], "little") == 2  # MSG_SEQNO0 after one request/response
    assert raw[0x170:0x190] == ctx.vmrk
    assert raw[0x190:0x1B0] == guest.vmpck0


@pytest.mark.parametrize(
    ("offset", "value", "error"),
    [
        (0x000, 0x00, MalformedStructure),  # magic
        (0x008, 0x02, UnsupportedVersion),  # format version
        (0x00A, 0x09, MalformedStructure),  # guest state
        (0x00B, 0x7F, MalformedStructure),  # op-state
        (0x00C, 0x80, MalformedStructure),  # unknown flag
        (0x010, 0x03, MalformedStructure),  # product
        (0x012, 0x01, ReservedNotZero),
        (0x225, 0x01, ReservedNotZero),
        (0x01A, 0x00, MalformedStructure),  # POLICY bits 23:16: the must-be-one bit 17 cleared
    ],
    ids=["magic", "version", "state", "op-state", "flags", "product", "rsvd-0x12", "rsvd-tail", "policy"],
)
def test_damaged_bytes_are_refused(guest: Guest, offset: int, value: int, error: type[AbiError]) -> None:
    raw = bytearray(_ctx(guest).to_bytes())
    raw[offset] = value
    with pytest.raises(error):
        GuestContext.from_bytes(bytes(raw))


def test_wrong_length_is_refused() -> None:
    with pytest.raises(MalformedStructure, match="0x240"):
        GuestContext.from_bytes(bytes(CONTEXT_SIZE - 1))
