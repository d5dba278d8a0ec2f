"""firmware.migration: an honest export/import, and attacks on the sealed stream at the firmware boundary.

Every attack must end with at most one runnable instance, the destination never committed to stale memory,
and the same opaque ``IntegrityError`` for every integrity failure.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
from mig_harness import MEMORY, Bundle, Session, fill_guest, launch_guest, new_sp

from cvmotion.abi import wire
from cvmotion.abi.guest_msg import KeyReq, KeyRsp, ReportRsp, RootKey
from cvmotion.abi.snp import AttestationReport, PolicyFlag
from cvmotion.abi.wire import BundleHeader, BundleType
from cvmotion.errors import FirmwareError, IntegrityError
from cvmotion.firmware.launch import PAGE_SIZE
from cvmotion.firmware.vendor import Vendor


@pytest.fixture
def session(emulated_vendor: Vendor, tmp_path: Path) -> Session:
    src = launch_guest(new_sp(emulated_vendor, tmp_path / "a"))
    fill_guest(src, random.Random(7))
    return Session(src=src, dst_sp=new_sp(emulated_vendor, tmp_path / "b"))


def _dst_committed(s: Session) -> bool:
    return s.dst_sp.migration.import_state(s.ref) in ("POST_IMPORT", "RUNNABLE")


def _src_can_run(s: Session) -> bool:
    return s.src.sp.migration.can_run(s.src.handle)


def _no_fork(s: Session) -> None:
    assert not (_dst_committed(s) and _src_can_run(s)), "two runnable instances"


def _same_memory(a: Session) -> bool:
    src, dst = a.src.hw.memory, a.dst_hw.memory
    ranges = src.populated_ranges()
    return all(src.read(gpa, length) == dst.read(gpa, length) for gpa, length in ranges)


def test_honest_migration_moves_memory_context_and_keys(session: Session) -> None:
    s = session
    rng = random.Random(1)
    # A VMRK-rooted key before the move.
    ch = s.src.channel
    vmrk_key_before = KeyRsp.from_bytes(
        ch.open_response(s.src.sp.guest_request(s.src.handle, ch.key_request(KeyReq(root_key=RootKey.VMRK))))
    ).derived_key
    s.run_precopy(rng)
    s.switchover()
    s.deliver()
    assert _dst_committed(s)
    assert not _src_can_run(s)
    handle = s.dst_sp.migration.import_activate(s.ref)
    assert s.dst_hw.restored == (b"vcpu-state", b"device-state")
    assert _same_memory(s)
    assert s.dst_hw.memory.read(0x310 << 12, 4096) == bytes(4096)
    # The guest's channel continues on the destination: same VMPCK0, sequence numbers carried over.
    report_req = ch.report_request(b"after".ljust(64, b"\0"))
    rsp = ReportRsp.from_bytes(ch.open_response(s.dst_sp.guest_request(handle, report_req)))
    report = AttestationReport.from_bytes(rsp.report)
    assert report.chip_id == s.dst_sp.get_id().ljust(64, b"\0")[:64]
    assert report.policy.flags & PolicyFlag.MIGRATE_MA
    # VMRK-rooted keys survive the move (sealed data stays readable).
    req = ch.key_request(KeyReq(root_key=RootKey.VMRK))
    assert KeyRsp.from_bytes(ch.open_response(s.dst_sp.guest_request(handle, req))).derived_key == vmrk_key_before
    s.src.sp.migration.export_finish(s.src.handle, s.dst_sp.migration.import_commit_receipt(s.ref))
    with pytest.raises(FirmwareError):
        s.src.sp.guest_request(s.src.handle, req)


def test_source_decommissions_only_on_the_destinations_commit_receipt(session: Session) -> None:
    s = session
    s.run_precopy(random.Random(5))
    s.switchover()
    s.deliver()
    assert _dst_committed(s)
    receipt = s.dst_sp.migration.import_commit_receipt(s.ref)
    assert receipt == s.dst_sp.migration.import_commit_receipt(s.ref)  # the same proof each time it is asked
    src = s.src.sp.migration
    forged = [
        b"",
        b"committed",
        _flip(receipt, len(receipt) - 1),  # the MAC
        _flip(receipt, 24),  # the session id
        _flip(receipt, 24 + 16),  # the start token digest
        _flip(receipt, 6),  # the type: an abort-shaped header
    ]
    for bad in forged:
        with pytest.raises(IntegrityError):
            src.export_finish(s.src.handle, bad)
        assert src.export_status(s.src.handle) == "POST_EXPORT"  # frozen and recoverable, not destroyed
    # Neither plaintext verdicts nor the host's own DECOMMISSION destroy the only recoverable copy.
    with pytest.raises(FirmwareError, match="POST_EXPORT"):
        s.src.sp.decommission(s.src.handle)
    src.export_finish(s.src.handle, receipt)
    assert src.export_status(s.src.handle) == "RUNNABLE"  # no session left: the context is gone
    with pytest.raises(FirmwareError):
        s.src.sp.guest_info(s.src.handle)


def test_no_commit_receipt_before_the_start_token(session: Session) -> None:
    s = session
    s.run_precopy(random.Random(6))
    s.deliver()
    with pytest.raises(FirmwareError, match="MEMORY_IMPORT|STATE_IMPORT"):
        s.dst_sp.migration.import_commit_receipt(s.ref)


def test_host_cannot_decommission_a_guest_that_is_being_exported(session: Session) -> None:
    s = session
    s.run_precopy(random.Random(7))
    with pytest.raises(FirmwareError, match="LIVE_EXPORT"):
        s.src.sp.decommission(s.src.handle)


@pytest.mark.parametrize("one_call", [False, True], ids=["export_start_token", "export_final"])
def test_start_token_refused_while_a_page_is_dirty(session: Session, one_call: bool) -> None:
    s = session
    s.run_precopy(random.Random(2))
    s.src.hw.guest_write(0x205 << 12, b"late write")
    with pytest.raises(FirmwareError, match="dirty or unexported"):
        s.switchover(final_gfns=[], one_call=one_call)  # a lazy (or malicious) engine skips the last dirty page
    assert not _dst_committed(s)


def test_export_pause_hands_the_host_the_pages_still_to_send(session: Session) -> None:
    """The harvest made once the VM is held is the engine's last dirty set: sending it is enough."""
    s = session
    s.run_precopy(random.Random(3))
    s.src.hw.guest_write(0x205 << 12, b"late write")
    s.src.hw.guest_write(0x301 << 12, b"another")
    s.src.hw.paused = True
    held = s.src.sp.migration.export_pause(s.src.handle)
    assert {0x205, 0x301} <= set(held.tolist())
    s.send_pages(held.tolist())
    s.bundles += [(0, b) for b in s.src.sp.migration.export_final(s.src.handle, 0)]
    s.deliver()
    assert _dst_committed(s)


def test_export_pause_names_a_write_the_firmware_folded_in_before_the_hold(session: Session) -> None:
    """A write the SP learned of (its view is fed every harvest) and folded in while it sealed other pages is
    still unexported at the hold: export_pause names it, so an engine whose own view lost it (its dirty log was
    restarted under it) completes by sending what the hold names."""
    s = session
    s.run_precopy(random.Random(6))
    s.src.hw.guest_write(0x206 << 12, b"a write the engine never hears of")
    s.src.hw.engine_dirty.clear()  # the engine's view lost it; the SP's did not
    s.send_pages([0x301])  # sealing another page folds the SP's view in: 0x206 is unexported, not pending
    s.src.hw.paused = True
    held = s.src.sp.migration.export_pause(s.src.handle)
    assert 0x206 in held.tolist()
    assert 0x301 not in held.tolist(), "exported after its last write: nothing to send"
    s.send_pages(held.tolist())
    s.bundles += [(0, b) for b in s.src.sp.migration.export_final(s.src.handle, 0)]
    s.deliver()
    assert _dst_committed(s)
    assert s.dst_hw.memory.read(0x206 << 12, 33) == b"a write the engine never hears of"


@pytest.mark.parametrize("one_call", [False, True], ids=["export_start_token", "export_final"])
def test_start_token_refused_over_a_write_after_the_hold(session: Session, one_call: bool) -> None:
    """A page written after export_pause's harvest (hardware that ignored the hold) is seen by the start token's
    own harvest, whichever command makes it."""
    s = session
    s.run_precopy(random.Random(4))
    s.src.hw.paused = True
    mig = s.src.sp.migration
    s.send_pages(mig.export_pause(s.src.handle).tolist())
    s.src.hw.paused = False  # hardware that did not keep the VM held
    s.src.hw.guest_write(0x207 << 12, b"after the hold")
    s.src.hw.paused = True
    final = mig.export_final if one_call else mig.export_start_token
    with pytest.raises(FirmwareError, match="dirty or unexported"):
        final(s.src.handle, 0)
    assert not _dst_committed(s)


def _unlogged_write(s: Session, gpa: int) -> None:
    """A page populated behind the dirty logs' back (a hostile VMM): only the SP's own look at memory finds it."""
    s.src.hw.memory.view(gpa, PAGE_SIZE)[:] = b"unlogged".ljust(PAGE_SIZE, b"!")


@pytest.mark.parametrize("one_call", [False, True], ids=["export_start_token", "export_final"])
@pytest.mark.parametrize("when", ["before export_start", "after export_start"])
def test_start_token_refused_over_a_populated_page_never_exported(session: Session, when: str, one_call: bool) -> None:
    """The start token needs every populated page exported: those populated when the export started (looked at
    then, not in the downtime) and those populated since (looked for in the start's holes at the start token)."""
    s = session
    gpa = 0x3F0 << 12  # inside guest RAM, outside what the guest populated
    if when == "before export_start":
        _unlogged_write(s, gpa)
    s.setup()
    if when == "after export_start":
        _unlogged_write(s, gpa)
    ranges = s.src.hw.memory.populated_ranges()
    s.src.hw.harvest()
    s.send_pages([g for a, n in ranges for g in range(a >> 12, (a + n) >> 12) if g != gpa >> 12])  # a lazy engine
    s.epoch()
    with pytest.raises(FirmwareError, match="dirty or unexported"):
        s.switchover(final_gfns=[], one_call=one_call)
    assert not _dst_committed(s)
    s.send_pages([gpa >> 12])  # sent: the refusal was for that page alone
    s.bundles.append((0, s.src.sp.migration.export_start_token(s.src.handle, 0)))


def test_guest_without_migrate_ma_cannot_export(emulated_vendor: Vendor, tmp_path: Path) -> None:
    guest = launch_guest(new_sp(emulated_vendor, tmp_path / "a"), policy=int(PolicyFlag.RESERVED_MBO | PolicyFlag.SMT))
    with pytest.raises(FirmwareError, match="MIGRATE_MA"):
        guest.sp.migration.ma_export_prepare(guest.handle, bytes(16))


def _flip(data: bytes, offset: int) -> bytes:
    b = bytearray(data)
    b[offset] ^= 0x01
    return bytes(b)


def _first(bundles: list[Bundle], kind: BundleType) -> int:
    return next(i for i, (_, b) in enumerate(bundles) if BundleHeader.from_bytes(b).type is kind)


def _memory_with_data(bundles: list[Bundle]) -> int:
    for i, (_, b) in enumerate(bundles):
        h = BundleHeader.from_bytes(b)
        if h.type is BundleType.MEMORY and len(b) > h.size:
            return i
    raise AssertionError("no memory bundle with data")


Attack = Callable[[list[Bundle]], list[Bundle]]


def _edit(index_of: Callable[[list[Bundle]], int], change: Callable[[bytes], bytes]) -> Attack:
    def attack(bundles: list[Bundle]) -> list[Bundle]:
        i = index_of(bundles)
        out = list(bundles)
        out[i] = (out[i][0], change(out[i][1]))
        return out

    return attack


def _page_bit(b: bytes) -> bytes:
    return _flip(b, BundleHeader.from_bytes(b).size + 100)


def _tag_bit(b: bytes) -> bytes:
    return _flip(b, BundleHeader.from_bytes(b).size + wire.PAGE_SIZE + 3)


def _swap_gpas(b: bytes) -> bytes:
    e0, e1 = wire.HEADER_SIZE + 8, wire.HEADER_SIZE + 16
    return b[:e0] + b[e1 : e1 + 8] + b[e0:e1] + b[e1 + 8 :]


def _drop(index_of: Callable[[list[Bundle]], int]) -> Attack:
    return lambda bundles: [x for i, x in enumerate(bundles) if i != index_of(bundles)]


def _swap_order(bundles: list[Bundle]) -> list[Bundle]:
    i = _memory_with_data(bundles)
    # The next bundle on the same stream.
    j = next(k for k in range(i + 1, len(bundles)) if bundles[k][0] == bundles[i][0])
    out = list(bundles)
    out[i], out[j] = out[j], out[i]
    return out


def _move_stream(b: bytes) -> bytes:
    h = BundleHeader.from_bytes(b)
    moved = BundleHeader(
        size=h.size, stream=h.stream ^ 1, type=h.type, mb_counter=h.mb_counter, epoch=h.epoch, iv_counter=h.iv_counter
    )
    return moved.to_bytes() + b[wire.HEADER_SIZE :]


def _replay_earlier_epoch(bundles: list[Bundle]) -> list[Bundle]:
    # Round 0's copy of a page, delivered again after later rounds: an epoch rollback.
    i = _memory_with_data(bundles)
    token = _first(bundles, BundleType.START_TOKEN)
    return [*bundles[:token], bundles[i], *bundles[token:]]


def _inject_page(b: bytes) -> bytes:
    # One more entry in the metadata of an authenticated bundle.
    h = BundleHeader.from_bytes(b)
    count = int.from_bytes(b[wire.HEADER_SIZE : wire.HEADER_SIZE + 2], "little")
    meta_end = h.size - wire.MAC_SIZE
    grown = (count + 1).to_bytes(2, "little") + b[wire.HEADER_SIZE + 2 : meta_end] + (0x7F0 << 12).to_bytes(8, "little")
    new_size = h.size + 8
    head = BundleHeader(
        size=new_size, stream=h.stream, type=h.type, mb_counter=h.mb_counter, epoch=h.epoch, iv_counter=h.iv_counter
    ).to_bytes()
    return head + grown + b[meta_end : h.size] + b[h.size :] + bytes(wire.PAGE_SIZE + wire.TAG_SIZE)


def _forge_epoch_total(b: bytes) -> bytes:
    # Claim one bundle fewer so a dropped bundle goes unnoticed: the MAC covers the metadata.
    total = int.from_bytes(b[wire.HEADER_SIZE : wire.HEADER_SIZE + 4], "little")
    return b[: wire.HEADER_SIZE] + (total - 1).to_bytes(4, "little") + b[wire.HEADER_SIZE + 4 :]


def _truncate(bundles: list[Bundle]) -> list[Bundle]:
    return bundles[: len(bundles) // 2]


ATTACKS: list[tuple[str, Attack]] = [
    ("flip-bit-in-page", _edit(_memory_with_data, _page_bit)),
    ("flip-bit-in-header", _edit(_memory_with_data, lambda b: _flip(b, 0x0C))),
    ("flip-bit-in-tag", _edit(_memory_with_data, _tag_bit)),
    ("flip-bit-in-mbmd-mac", _edit(_memory_with_data, lambda b: _flip(b, BundleHeader.from_bytes(b).size - 1))),
    ("flip-bit-in-vcpu-state", _edit(lambda bs: _first(bs, BundleType.VCPU_STATE), lambda b: _flip(b, len(b) - 20))),
    ("reorder-within-stream", _swap_order),
    ("move-bundle-to-other-stream", _edit(_memory_with_data, _move_stream)),
    ("replay-from-earlier-epoch", _replay_earlier_epoch),
    ("drop-memory-bundle", _drop(_memory_with_data)),
    ("withhold-epoch-token", _drop(lambda bs: _first(bs, BundleType.EPOCH_TOKEN))),
    ("forge-epoch-token-count", _edit(lambda bs: _first(bs, BundleType.EPOCH_TOKEN), _forge_epoch_total)),
    ("swap-gpas", _edit(_memory_with_data, _swap_gpas)),
    ("inject-extra-page", _edit(_memory_with_data, _inject_page)),
    ("truncate-stream", _truncate),
    ("drop-state-bundle", _drop(lambda bs: _first(bs, BundleType.MUTABLE_STATE))),
    ("duplicate-bundle", lambda bs: [*bs[:3], bs[2], *bs[3:]]),
]


def test_replay_from_an_earlier_session_fails(emulated_vendor: Vendor, tmp_path: Path) -> None:
    src = launch_guest(new_sp(emulated_vendor, tmp_path / "a"))
    fill_guest(src, random.Random(5))
    first = Session(src=src, dst_sp=new_sp(emulated_vendor, tmp_path / "b"))
    first.run_precopy(random.Random(6), rounds=0)
    src.sp.migration.export_abort(src.handle)  # the first attempt is abandoned before the start token
    second = Session(src=src, dst_sp=first.dst_sp)
    second.setup()
    errors: list[Exception] = []
    # Bundles of the first session (other key) offered to the second session's import context.
    second.deliver([second.bundles[0], *first.bundles[1:]], on_error=errors.append)
    assert len(errors) == 1
    assert isinstance(errors[0], IntegrityError)
    assert second.dst_sp.migration.import_state(second.ref) == "FAILED"


def test_forged_and_replayed_tokens(session: Session, emulated_vendor: Vendor, tmp_path: Path) -> None:
    s = session
    s.run_precopy(random.Random(8))
    s.switchover()
    start_token = s.bundles[-1][1]
    # Forged start token: right layout, wrong MAC.
    forged = _flip(start_token, len(start_token) - 1)
    errors: list[Exception] = []
    s.deliver([*s.bundles[:-1], (0, forged)], on_error=errors.append)
    assert errors
    assert not _dst_committed(s)
    # A forged abort token cannot resume the frozen source.
    with pytest.raises(IntegrityError):
        s.src.sp.migration.export_abort_with_token(s.src.handle, forged)
    assert not _src_can_run(s)
    # Resuming without a token is refused by the firmware: the source is frozen.
    with pytest.raises(FirmwareError):
        s.src.sp.migration.export_abort(s.src.handle)
    assert not _src_can_run(s)


def test_no_abort_token_after_commit(session: Session) -> None:
    s = session
    s.run_precopy(random.Random(9))
    s.switchover()
    s.deliver()
    assert _dst_committed(s)
    with pytest.raises(FirmwareError, match="committed"):
        s.dst_sp.migration.import_abort(s.ref)
    assert not _src_can_run(s)


def test_memory_sizes(session: Session) -> None:
    assert session.src.hw.gfn_limit == MEMORY >> 12


# -- export_switchover: the whole stop-and-copy as one firmware command ----------------------------------------


def _switchover(s: Session) -> int:
    """``export_switchover`` as the daemon drives it; returns how many pages the firmware sealed itself."""
    done = s.src.sp.migration.export_switchover(s.src.handle, 0)
    assert not len(done.pending)
    s.bundles += [(0, b) for b in done.bundles]
    return done.pages


def test_switchover_seals_the_pages_written_since_the_last_round_itself(session: Session) -> None:
    """Pages the guest wrote after the last round, and one the engine never sent (a lazy or hostile engine): the
    firmware's own clean map names them, it seals them in the same command, and the VM moves with them."""
    s = session
    s.run_precopy(random.Random(11))
    s.src.hw.guest_write(0x205 << 12, b"late write")
    s.src.hw.guest_write(0x301 << 12, b"another")
    s.src.hw.harvest()  # the engine saw them and sends nothing: the firmware still does
    assert _switchover(s) >= 2
    assert s.src.hw.paused, "the firmware had the hardware pause the VM"
    assert s.src.sp.migration.export_status(s.src.handle) == "POST_EXPORT"
    assert not _src_can_run(s)
    s.deliver()
    s.dst_sp.migration.import_activate(s.ref, run=True)
    assert s.dst_hw.running
    assert _same_memory(s)
    assert s.dst_hw.memory.read(0x205 << 12, 10) == b"late write"


def test_switchover_seals_a_populated_page_never_exported(session: Session) -> None:
    """A page populated behind the dirty logs' back is found by the firmware's look at memory and sealed."""
    s = session
    s.setup()
    ranges = s.src.hw.memory.populated_ranges()
    s.src.hw.harvest()
    s.send_pages([g for a, n in ranges for g in range(a >> 12, (a + n) >> 12)])
    s.epoch()
    _unlogged_write(s, 0x3F0 << 12)
    _switchover(s)
    s.deliver()
    assert _dst_committed(s)
    assert s.dst_hw.memory.read(0x3F0 << 12, 8) == b"unlogged"


def test_switchover_seals_several_bundles(session: Session) -> None:
    s = session
    s.run_precopy(random.Random(15))
    s.src.sp.migration.switchover_pages = 4 * wire.MAX_PAGES_PER_BUNDLE  # the SP's own limit is a quarter bundle
    pages = range(0x400, 0x400 + 2 * wire.MAX_PAGES_PER_BUNDLE + 3)
    for gfn in pages:
        s.src.hw.guest_write(gfn << 12, gfn.to_bytes(8, "little"))
    assert _switchover(s) == len(pages)
    assert sum(1 for _, b in s.bundles[-7:] if b[6] == BundleType.MEMORY) == 3
    s.deliver()
    assert _dst_committed(s)
    assert _same_memory(s)


def test_switchover_names_the_pages_when_too_many_are_left(session: Session) -> None:
    """More pages left than the firmware seals in one answer: the export stops held (PAUSED_EXPORT) and names
    them; sent by the engine, export_final ends it. A start token before they are sent is refused."""
    s = session
    s.run_precopy(random.Random(12))
    mig = s.src.sp.migration
    mig.switchover_pages = 64  # smaller than the SP's own constant here, to fit the test's guest
    pages = range(0x400, 0x400 + 65)
    for gfn in pages:
        s.src.hw.guest_write(gfn << 12, gfn.to_bytes(8, "little"))
    done = mig.export_switchover(s.src.handle, 0)
    assert not done.bundles
    assert set(pages) <= set(done.pending.tolist())
    assert mig.export_status(s.src.handle) == "PAUSED_EXPORT"
    assert not _src_can_run(s)
    with pytest.raises(FirmwareError, match="dirty or unexported"):
        mig.export_start_token(s.src.handle, 0)
    s.send_pages(done.pending.tolist())
    s.bundles += [(0, b) for b in mig.export_final(s.src.handle, 0)]
    s.deliver()
    assert _dst_committed(s)
    assert _same_memory(s)


def test_final_after_a_switchover_that_named_pages_keeps_the_held_state_and_harvests_again(session: Session) -> None:
    """The switchover captured the state at the hold and named its pages: export_final does not capture again (the
    VM stayed held) but still rests the start token on a harvest made after the engine's pages were sealed."""
    s = session
    s.run_precopy(random.Random(17))
    mig = s.src.sp.migration
    mig.switchover_pages = 0
    captures = []
    capture = s.src.hw.capture_state
    s.src.hw.capture_state = lambda: captures.append(1) or capture()  # type: ignore[method-assign]
    s.src.hw.guest_write(0x410 << 12, b"left for the streams")
    done = mig.export_switchover(s.src.handle, 0)
    assert done.pending.tolist() == [0x410]
    s.send_pages(done.pending.tolist())
    before = s.src.hw.fresh_harvests
    s.bundles += [(0, b) for b in mig.export_final(s.src.handle, 0)]
    assert len(captures) == 1
    assert s.src.hw.fresh_harvests == before + 1
    s.deliver()
    assert _dst_committed(s)
    assert _same_memory(s)


def test_final_after_a_switchover_refuses_the_token_over_a_write_while_the_streams_sealed(session: Session) -> None:
    """A write that lands while the engine sealed the named pages (hardware that broke the hold): export_final's
    own harvest sees it, the start token is refused, and the export can still be aborted."""
    s = session
    s.run_precopy(random.Random(18))
    mig = s.src.sp.migration
    mig.switchover_pages = 0
    s.src.hw.guest_write(0x410 << 12, b"left for the streams")
    done = mig.export_switchover(s.src.handle, 0)
    s.send_pages(done.pending.tolist())
    s.src.hw.write_while_sealing = 0x206 << 12
    _token_refused_and_source_recovers(s, lambda: mig.export_final(s.src.handle, 0))


def _token_refused_and_source_recovers(s: Session, command: Callable[[], object]) -> None:
    """``command`` is refused its start token; the export stays held and an abort lets the guest run here."""
    mig = s.src.sp.migration
    with pytest.raises(FirmwareError, match="dirty or unexported"):
        command()
    assert mig.export_status(s.src.handle) == "PAUSED_EXPORT"
    mig.export_abort(s.src.handle)
    assert _src_can_run(s)
    assert not _dst_committed(s)


def test_switchover_when_the_vm_cannot_pause_leaves_the_export_live(session: Session) -> None:
    """The hardware failed to pause: nothing was sealed, the export is LIVE_EXPORT again, and an abort lets the
    guest run on the source."""
    s = session
    s.run_precopy(random.Random(13))
    s.src.hw.fail_pause = True
    mig = s.src.sp.migration
    with pytest.raises(RuntimeError, match="could not pause"):
        mig.export_switchover(s.src.handle, 0)
    assert mig.export_status(s.src.handle) == "LIVE_EXPORT"
    mig.export_abort(s.src.handle)
    assert _src_can_run(s)


def test_switchover_refuses_the_start_token_over_a_write_while_it_sealed(session: Session) -> None:
    """A page written after the switchover's harvest, while the SP sealed (a DMA device left running): the start
    token's own harvest sees it, the token is refused, and the export can still be aborted."""
    s = session
    s.run_precopy(random.Random(16))
    s.src.hw.guest_write(0x240 << 12, b"after the last round")  # the switchover seals this page itself
    s.src.hw.write_while_sealing = 0x206 << 12
    _token_refused_and_source_recovers(s, lambda: s.src.sp.migration.export_switchover(s.src.handle, 0))


def test_switchover_with_nothing_left_rests_the_token_on_the_holds_harvest(session: Session) -> None:
    """Nothing written since the last round: the switchover seals no page, so every page the start token certifies
    was read before the hold's harvest, and the token rests on that harvest (no second round trip to the hardware
    inside the blackout). The VM still moves."""
    s = session
    s.run_precopy(random.Random(17))
    before = s.src.hw.fresh_harvests
    assert _switchover(s) == 0
    assert s.src.hw.fresh_harvests == before + 1  # the hold's harvest, and no other
    s.deliver()
    assert _dst_committed(s)
    assert not _src_can_run(s)


def test_switchover_is_refused_outside_live_export(session: Session) -> None:
    s = session
    mig = s.src.sp.migration
    with pytest.raises(FirmwareError):
        mig.export_switchover(s.src.handle, 0)  # no export started
    s.run_precopy(random.Random(14))
    _switchover(s)
    with pytest.raises(FirmwareError):
        mig.export_switchover(s.src.handle, 0)  # a second stop-and-copy: a second start token
    assert sum(1 for _, b in s.bundles if b[6] == BundleType.START_TOKEN) == 1
