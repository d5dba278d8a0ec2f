"""Each attack on the sealed stream (``ATTACKS`` of test_migration_firmware) ends in its specific outcome.

An attack must not merely leave the destination "not committed": one that goes unnoticed until the stream ends
could be a check that silently stopped working.  So each attack names the bundle the destination refuses (the
first one whose acceptance would be wrong), and the refusal is the one opaque ``IntegrityError`` that fails
the import context for ever.  Only a stream cut short ("truncate-stream") is refused by nothing: the import
waits, uncommitted and not failed, and the source stays frozen until the destination's abort token.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
from mig_harness import Bundle, Session, filled_session
from test_migration_firmware import ATTACKS, _first, _memory_with_data

from cvmotion.abi.wire import BundleHeader, BundleType
from cvmotion.errors import IntegrityError
from cvmotion.firmware.vendor import Vendor

pytestmark = pytest.mark.timeout(60)

Where = Callable[[list[Bundle]], int | None]  # honest bundles -> index refused in the attacked list (None: none)


def _same(index_of: Callable[[list[Bundle]], int]) -> Where:
    """The attacked bundle itself (an edit, a swap, a move)."""
    return index_of


def _after_drop(index_of: Callable[[list[Bundle]], int]) -> Where:
    """A bundle dropped at ``i``: the next one on its stream (counter gap) or the next token (total)."""

    def where(bundles: list[Bundle]) -> int:
        i = index_of(bundles)
        stream = bundles[i][0]
        rest = [b for k, b in enumerate(bundles) if k != i]
        tokens = (BundleType.EPOCH_TOKEN, BundleType.START_TOKEN)
        return next(
            k for k in range(i, len(rest)) if rest[k][0] == stream or BundleHeader.from_bytes(rest[k][1]).type in tokens
        )

    return where


EXPECTED: dict[str, Where] = {
    "flip-bit-in-page": _same(_memory_with_data),
    "flip-bit-in-header": _same(_memory_with_data),
    "flip-bit-in-tag": _same(_memory_with_data),
    "flip-bit-in-mbmd-mac": _same(_memory_with_data),
    "flip-bit-in-vcpu-state": _same(lambda bs: _first(bs, BundleType.VCPU_STATE)),
    "reorder-within-stream": _same(_memory_with_data),
    "move-bundle-to-other-stream": _same(_memory_with_data),
    "replay-from-earlier-epoch": _same(lambda bs: _first(bs, BundleType.START_TOKEN)),
    "drop-memory-bundle": _after_drop(_memory_with_data),
    "withhold-epoch-token": _same(lambda bs: _first(bs, BundleType.EPOCH_TOKEN)),
    "forge-epoch-token-count": _same(lambda bs: _first(bs, BundleType.EPOCH_TOKEN)),
    "swap-gpas": _same(_memory_with_data),
    "inject-extra-page": _same(_memory_with_data),
    "truncate-stream": lambda bs: None,
    "drop-state-bundle": _same(lambda bs: _first(bs, BundleType.MUTABLE_STATE)),
    "duplicate-bundle": lambda bs: 3,
}


def test_every_attack_has_an_expected_outcome() -> None:
    assert sorted(EXPECTED) == sorted(name for name, _ in ATTACKS)


@pytest.fixture
def session(emulated_vendor: Vendor, tmp_path: Path) -> Session:
    return filled_session(emulated_vendor, tmp_path, 7)


@pytest.mark.parametrize(("name", "attack"), ATTACKS, ids=[n for n, _ in ATTACKS])
def test_attack_on_stream_fails_closed(session: Session, name: str, attack: Callable[..., list[Bundle]]) -> None:
    s = session
    s.run_precopy(random.Random(3))
    s.switchover()
    expected = EXPECTED[name](s.bundles)
    attacked = attack(s.bundles)
    mig = s.dst_sp.migration
    refused: tuple[int, Exception] | None = None
    for i, (_, data) in enumerate(attacked):
        try:
            mig.import_bundle(s.ref, data)
        except Exception as exc:
            refused = (i, exc)
            break
    if expected is None:
        assert refused is None, f"refused at {refused}: expected a stall"
        assert mig.import_state(s.ref) in ("MEMORY_IMPORT", "STATE_IMPORT")
    else:
        assert refused is not None, "the attack went unnoticed to the end of the stream"
        index, error = refused
        assert index == expected, f"refused at bundle {index}, expected {expected}"
        assert type(error) is IntegrityError
        assert str(error) == "integrity check failed"
        assert mig.import_state(s.ref) == "FAILED"
        # Failed for ever: the rest of the honest stream, the start token included, is refused too.
        with pytest.raises(IntegrityError):
            mig.import_bundle(s.ref, s.bundles[-1][1])
    assert not s.src.sp.migration.can_run(s.src.handle)
    token = mig.import_abort(s.ref)
    s.src.sp.migration.export_abort_with_token(s.src.handle, token)
    assert s.src.sp.migration.can_run(s.src.handle)
    assert mig.import_state(s.ref) == "FAILED"
