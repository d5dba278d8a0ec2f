"""The epoch token's and the start token's ``total_mb``: the only checks that catch a bundle withheld at the very end
of a stream (no later bundle on that stream exposes the gap through its ``mb_counter``).

Real sealed bundles between two emulated SPs: round 0 and the final pages go over two streams, everything after
them over stream 0, and the attacker drops the last bundle of stream 1.  Without the total check the destination
would commit with those pages missing (stale memory, a rollback).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from mig_harness import Bundle, Session, filled_session

from cvmotion.abi.wire import BundleHeader, BundleType
from cvmotion.errors import IntegrityError
from cvmotion.firmware.vendor import Vendor

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def session(emulated_vendor: Vendor, tmp_path: Path) -> Session:
    return filled_session(emulated_vendor, tmp_path, 11)


def _populated(s: Session) -> list[int]:
    return [g for gpa, n in s.src.hw.memory.populated_ranges() for g in range(gpa >> 12, (gpa + n) >> 12)]


def _last_on_stream(bundles: list[Bundle], stream: int, before: int) -> int:
    """Index of the last memory bundle on ``stream`` before index ``before``."""
    return max(
        i
        for i, (st, b) in enumerate(bundles[:before])
        if st == stream and BundleHeader.from_bytes(b).type is BundleType.MEMORY
    )


def _first(bundles: list[Bundle], kind: BundleType, after: int = 0) -> int:
    return next(i for i, (_, b) in enumerate(bundles) if i >= after and BundleHeader.from_bytes(b).type is kind)


def _deliver_until_failure(s: Session, bundles: list[Bundle]) -> tuple[int | None, Exception | None]:
    """Feed the destination; the index of the first refused bundle and its error (None, None: all accepted)."""
    for i, (_, data) in enumerate(bundles):
        try:
            s.dst_sp.migration.import_bundle(s.ref, data)
        except Exception as exc:
            return i, exc
    return None, None


def _final_epoch_over_two_streams(s: Session) -> None:
    """Round 0 over two streams, one more round over stream 0, then the final pages over two streams."""
    rng = random.Random(12)
    s.setup()
    s.src.hw.harvest()
    s.send_pages(_populated(s), streams=2)
    s.epoch()
    for _ in range(6):
        s.src.hw.guest_write(0x200000 + (rng.randrange(0, 1 << 20) & ~7), rng.randbytes(8))
    s.send_pages(s.src.hw.harvest(), streams=1)
    s.epoch()
    for gfn in range(0x280, 0x2A0):  # enough for a bundle on each stream
        s.src.hw.guest_write(gfn << 12, rng.randbytes(64))
    s.src.hw.paused = True
    s.src.sp.migration.export_pause(s.src.handle)
    s.send_pages(s.src.hw.harvest(), streams=2, per_bundle=16)
    for kind in (BundleType.VCPU_STATE, BundleType.DEVICE_STATE, BundleType.MUTABLE_STATE):
        s.bundles.append((0, s.src.sp.migration.export_state(s.src.handle, 0, kind)))
    s.bundles.append((0, s.src.sp.migration.export_start_token(s.src.handle, 0)))


def _assert_refused_at(s: Session, bundles: list[Bundle], at: int) -> None:
    index, error = _deliver_until_failure(s, bundles)
    assert index == at, f"refused at bundle {index}, expected the token at {at}"
    assert type(error) is IntegrityError
    assert str(error) == "integrity check failed"
    assert s.dst_sp.migration.import_state(s.ref) == "FAILED"
    assert s.dst_sp.migration.import_handle(s.ref) is None or not s.dst_sp.migration.can_run(
        s.dst_sp.migration.import_handle(s.ref)  # type: ignore[arg-type]
    )


def test_the_honest_stream_of_this_shape_commits(session: Session) -> None:
    s = session
    _final_epoch_over_two_streams(s)
    index, error = _deliver_until_failure(s, s.bundles)
    assert (index, error) == (None, None)
    assert s.dst_sp.migration.import_state(s.ref) == "POST_IMPORT"


def test_a_bundle_withheld_at_the_end_of_an_epoch_is_caught_by_the_epoch_token(session: Session) -> None:
    s = session
    _final_epoch_over_two_streams(s)
    token = _first(s.bundles, BundleType.EPOCH_TOKEN)
    dropped = _last_on_stream(s.bundles, 1, token)
    assert all(st == 0 for st, _ in s.bundles[dropped + 1 : _first(s.bundles, BundleType.EPOCH_TOKEN, token + 1)])
    bundles = [b for i, b in enumerate(s.bundles) if i != dropped]
    # Stream 1 sends again only in the final epoch: its counter would expose the gap too late, after round 1.
    _assert_refused_at(s, bundles, token - 1)


def test_a_bundle_withheld_at_the_end_of_the_final_epoch_is_caught_by_the_start_token(session: Session) -> None:
    s = session
    _final_epoch_over_two_streams(s)
    start = _first(s.bundles, BundleType.START_TOKEN)
    dropped = _last_on_stream(s.bundles, 1, start)
    assert dropped > _first(s.bundles, BundleType.EPOCH_TOKEN, _first(s.bundles, BundleType.EPOCH_TOKEN) + 1)
    bundles = [b for i, b in enumerate(s.bundles) if i != dropped]
    _assert_refused_at(s, bundles, start - 1)
    # The frozen source resumes only with the destination's abort token.
    token = s.dst_sp.migration.import_abort(s.ref)
    s.src.sp.migration.export_abort_with_token(s.src.handle, token)
    assert s.src.sp.migration.can_run(s.src.handle)
