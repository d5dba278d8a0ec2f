"""MSG_KEY_REQ: VCEK-rooted keys are bound to the chip and TCB; VMRK-rooted keys travel with the guest context."""

from __future__ import annotations

from pathlib import Path

import pytest
from fw_helpers import Guest, launch, new_sp

from cvmotion.abi.guest_msg import GuestChannel, GuestFieldSelect, KeyReq, KeyRsp, RootKey
from cvmotion.abi.snp import Product, TcbVersion
from cvmotion.firmware.context import GuestContext
from cvmotion.firmware.device import GuestHandle, SecureProcessor
from cvmotion.firmware.vendor import Vendor


def _key(sp: SecureProcessor, handle: GuestHandle, channel: GuestChannel, req: KeyReq) -> KeyRsp:
    return KeyRsp.from_bytes(channel.open_response(sp.guest_request(handle, channel.key_request(req))))


def _ok(sp: SecureProcessor, handle: GuestHandle, channel: GuestChannel, req: KeyReq) -> bytes:
    rsp = _key(sp, handle, channel, req)
    assert rsp.status == 0
    return rsp.derived_key


def _migrate(src: Guest, dst: SecureProcessor) -> GuestHandle:
    """Move the guest context byte-exactly (what issue 4's immutable-state bundle will carry)."""
    ctx = src.sp._guests[src.handle]  # test-only: the SP-internal context
    return dst._adopt_context(GuestContext.from_bytes(ctx.to_bytes()))


def test_keys_are_deterministic_and_field_sensitive(guest: Guest) -> None:
    sp, handle, channel = guest.sp, guest.handle, guest.channel()
    base = KeyReq(root_key=RootKey.VCEK, guest_field_select=GuestFieldSelect.MEASUREMENT)
    first = _ok(sp, handle, channel, base)
    assert _ok(sp, handle, channel, base) == first
    assert len(first) == 32
    variants = [
        KeyReq(root_key=RootKey.VCEK),
        KeyReq(root_key=RootKey.VCEK, guest_field_select=GuestFieldSelect.GUEST_POLICY),
        KeyReq(root_key=RootKey.VCEK, guest_field_select=GuestFieldSelect.MEASUREMENT, vmpl=1),
        KeyReq(root_key=RootKey.VMRK, guest_field_select=GuestFieldSelect.MEASUREMENT),
    ]
    keys = {first, *(_ok(sp, handle, channel, v) for v in variants)}
    assert len(keys) == 1 + len(variants)


def test_vmrk_keys_survive_migration_vcek_keys_do_not(emulated_vendor: Vendor, tmp_path: Path) -> None:
    src = launch(new_sp(emulated_vendor, tmp_path / "a"))
    dst = new_sp(emulated_vendor, tmp_path / "b")
    vmrk_req = KeyReq(root_key=RootKey.VMRK, guest_field_select=GuestFieldSelect.MEASUREMENT)
    vcek_req = KeyReq(root_key=RootKey.VCEK, guest_field_select=GuestFieldSelect.MEASUREMENT)
    channel = src.channel()
    before_vmrk = _ok(src.sp, src.handle, channel, vmrk_req)
    before_vcek = _ok(src.sp, src.handle, channel, vcek_req)
    moved = _migrate(src, dst)
    # The same guest, same VMPCK and sequence numbers, now answered by another chip.
    after_vmrk = _ok(dst, moved, channel, vmrk_req)
    after_vcek = _ok(dst, moved, channel, vcek_req)
    assert after_vmrk == before_vmrk
    assert after_vcek != before_vcek
    assert dst.guest_info(moved).measurement == src.sp.guest_info(src.handle).measurement


def test_vcek_keys_follow_the_tcb(guest: Guest) -> None:
    sp, handle, channel = guest.sp, guest.handle, guest.channel()
    old = sp.platform_status().reported_tcb
    pinned = KeyReq(
        root_key=RootKey.VCEK,
        guest_field_select=GuestFieldSelect.TCB_VERSION,
        tcb_version=old.to_u64(Product.GENOA.tcb_layout),
    )
    unpinned = KeyReq(root_key=RootKey.VCEK)
    pinned_before, unpinned_before = _ok(sp, handle, channel, pinned), _ok(sp, handle, channel, unpinned)
    newer = TcbVersion(boot_loader=old.boot_loader, tee=old.tee, snp=old.snp + 1, microcode=old.microcode)
    sp.update_tcb(newer, commit=True)
    # A key pinned to the old TCB is still derivable after the upgrade (data sealed before stays readable);
    # the unpinned key now comes from the new VCEK.
    assert _ok(sp, handle, channel, pinned) == pinned_before
    assert _ok(sp, handle, channel, unpinned) != unpinned_before


@pytest.mark.parametrize(
    "req",
    [
        KeyReq(guest_field_select=GuestFieldSelect.GUEST_SVN, guest_svn=1),  # launch SVN is 0
        KeyReq(guest_field_select=GuestFieldSelect.TCB_VERSION, tcb_version=0xFF00000000000000),  # ucode 255
        KeyReq(guest_field_select=GuestFieldSelect.TCB_VERSION, tcb_version=0x0000FF0000000000),  # reserved byte
        KeyReq(vmpl=4),
        KeyReq(key_sel=2),  # VLEK-rooted without a VLEK: INVALID_KEY
    ],
    ids=["svn-above-launch", "tcb-above-committed", "tcb-reserved", "vmpl-4", "no-vlek"],
)
def test_invalid_key_requests_get_a_status(guest: Guest, req: KeyReq) -> None:
    rsp = _key(guest.sp, guest.handle, guest.channel(), req)
    assert rsp.status in (0x16, 0x27)
    assert rsp.derived_key == bytes(32)
    assert _ok(guest.sp, guest.handle, guest.channel(), KeyReq()) != bytes(32)  # the channel is still in sync


def test_uncommitted_tcb_is_not_requestable(guest: Guest) -> None:
    sp = guest.sp
    old = sp.platform_status().reported_tcb
    newer = TcbVersion(boot_loader=old.boot_loader, tee=old.tee, snp=old.snp + 1, microcode=old.microcode)
    sp.update_tcb(newer)  # installed, not committed
    req = KeyReq(guest_field_select=GuestFieldSelect.TCB_VERSION, tcb_version=newer.to_u64(Product.GENOA.tcb_layout))
    assert _key(sp, guest.handle, guest.channel(), req).status == 0x16
