"""firmware.sp_seal / sp_snapshot: the SP's state across a platform-process restart — whole, once, never rolled back.

The attacker is the host: it holds the sealed blob and the data directory, can replay an older save, open
one save twice, flip any byte, or hand one chip's save to another.  Each is refused with the same opaque
``IntegrityError``; an honest save comes back with every guest's op-state, keys and sequence numbers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fw_helpers import Guest, launch, new_sp

from cvmotion.abi.guest_msg import ReportRsp
from cvmotion.errors import FirmwareError, FirmwareStatus, IntegrityError
from cvmotion.firmware.context import OpState
from cvmotion.firmware.device import SecureProcessor
from cvmotion.firmware.kds import Kds
from cvmotion.firmware.launch import PageType
from cvmotion.firmware.sp_seal import NVRAM_FILE
from cvmotion.firmware.vendor import Vendor


def _report_ok(sp: SecureProcessor, guest: Guest) -> bool:
    channel = guest.channel()
    rsp = sp.guest_request(guest.handle, channel.report_request(b"\x01" * 64))
    return ReportRsp.from_bytes(channel.open_response(rsp)).status == 0


def _restore(sp: SecureProcessor, vendor: Vendor, blob: bytes) -> SecureProcessor:
    restored, _ = SecureProcessor.restore_sealed(sp._chip, blob, endorsements=Kds(vendor))
    return restored


def test_round_trip_keeps_contexts_and_sequence_numbers(sp: SecureProcessor, emulated_vendor: Vendor) -> None:
    guests = [launch(sp), launch(sp)]
    for guest in guests:
        assert _report_ok(sp, guest)
        assert _report_ok(sp, guest)
    before = {g.handle: sp.guest_info(g.handle) for g in guests}
    blob = sp.seal_state(b"platform bindings")
    restored, extra = SecureProcessor.restore_sealed(sp._chip, blob, endorsements=Kds(emulated_vendor))
    assert extra == b"platform bindings"
    for guest in guests:
        assert restored.guest_info(guest.handle) == before[guest.handle]
        # The guest's channel carries on: the restored context expects the next sequence number, not 1.
        assert _report_ok(restored, guest)
    # A new guest gets a fresh handle, never one a restored guest holds.
    assert launch(restored).handle not in {g.handle for g in guests}


def test_sealed_sp_refuses_every_command(sp: SecureProcessor, guest: Guest) -> None:
    sp.seal_state()
    for call in (
        lambda: sp.guest_request(guest.handle, guest.channel().report_request(bytes(64))),
        lambda: sp.guest_info(guest.handle),
        lambda: sp.launch_start(0x30000),
        lambda: sp.decommission(guest.handle),
        lambda: sp.seal_state(),
    ):
        with pytest.raises(FirmwareError) as err:
            call()
        assert err.value.status is FirmwareStatus.INVALID_PLATFORM_STATE
    assert not sp.migration.can_run(guest.handle)


def test_replayed_older_save_is_refused(sp: SecureProcessor, guest: Guest, emulated_vendor: Vendor) -> None:
    old = sp.seal_state()
    second = _restore(sp, emulated_vendor, old)
    assert _report_ok(second, guest)  # sequence numbers advance past what ``old`` holds
    newer = second.seal_state()
    with pytest.raises(IntegrityError):
        _restore(sp, emulated_vendor, old)  # would reset the VMPCK sequence numbers
    third = _restore(sp, emulated_vendor, newer)
    assert _report_ok(third, guest)


def test_a_save_opens_once(sp: SecureProcessor, guest: Guest, emulated_vendor: Vendor) -> None:
    blob = sp.seal_state()
    _restore(sp, emulated_vendor, blob)
    with pytest.raises(IntegrityError):
        _restore(sp, emulated_vendor, blob)  # a second platform process with the same guests: a fork


@pytest.mark.parametrize(
    "offset", [0, 9, 16, 24, 0x20, 0x2B, 0x40, -17, -1], ids=lambda o: f"byte{o:#x}" if o >= 0 else f"end{o}"
)
def test_tampered_save_is_one_opaque_error(
    sp: SecureProcessor, guest: Guest, emulated_vendor: Vendor, offset: int
) -> None:
    blob = bytearray(sp.seal_state())
    blob[offset] ^= 0x01
    with pytest.raises(IntegrityError) as err:
        _restore(sp, emulated_vendor, bytes(blob))
    assert str(err.value) == "integrity check failed"


@pytest.mark.parametrize("cut", [0, 10, 0x2C, -1])
def test_truncated_save_is_refused(sp: SecureProcessor, guest: Guest, emulated_vendor: Vendor, cut: int) -> None:
    blob = sp.seal_state()
    with pytest.raises(IntegrityError):
        _restore(sp, emulated_vendor, blob[:cut])


def test_another_chips_save_is_refused(
    sp: SecureProcessor, guest: Guest, emulated_vendor: Vendor, tmp_path: Path
) -> None:
    other = new_sp(emulated_vendor, tmp_path / "other")
    launch(other)
    foreign = other.seal_state()
    with pytest.raises(IntegrityError):
        _restore(sp, emulated_vendor, foreign)


def test_forged_or_missing_counter_refuses_the_save(sp: SecureProcessor, guest: Guest, emulated_vendor: Vendor) -> None:
    blob = sp.seal_state()
    nvram = sp._chip.data_dir / NVRAM_FILE
    genuine = nvram.read_bytes()
    forged = bytearray(genuine)
    forged[16] ^= 0x01  # the generation
    nvram.write_bytes(bytes(forged))
    with pytest.raises(IntegrityError):
        _restore(sp, emulated_vendor, blob)
    nvram.unlink()
    with pytest.raises(IntegrityError):
        _restore(sp, emulated_vendor, blob)
    nvram.write_bytes(genuine)
    _restore(sp, emulated_vendor, blob)


def test_state_is_never_plaintext_on_disk(sp: SecureProcessor, guest: Guest) -> None:
    ctx = sp._guests[guest.handle]
    secrets = [*ctx.vmpcks, ctx.vmrk, ctx.report_id, ctx.to_bytes()[0x150:0x170]]
    blob = sp.seal_state()
    on_disk = blob + (sp._chip.data_dir / NVRAM_FILE).read_bytes()
    for secret in secrets:
        assert secret not in on_disk
        assert secret.hex().encode() not in on_disk
    assert b"CVMGCTX" not in on_disk


def test_no_seal_while_a_guest_is_launching(sp: SecureProcessor, guest: Guest) -> None:
    handle = sp.launch_start(0x30000)
    sp.launch_update(handle, 0, PageType.NORMAL, bytes(4096))
    with pytest.raises(FirmwareError) as err:
        sp.seal_state()
    assert err.value.status is FirmwareStatus.INVALID_GUEST_STATE
    assert sp.guest_info(guest.handle).op_state is OpState.RUNNABLE  # refused: nothing sealed, nothing stopped
