"""The pre-copy's stopping rule (``migration.sender.switch_now``): never past the limit, and within it one more
round while the last one still shrank the dirty set fast and what is left would pause the guest noticeably."""

from __future__ import annotations

import pytest

from cvmotion.migration.sender import switch_now


def test_never_over_the_limit() -> None:
    assert not switch_now(301.0, 300.0, 0.1, 1000, 1, last_round=True)


def test_within_the_limit_a_fast_shrinking_set_gets_another_round() -> None:
    # Round 0 sent 262,144 pages, 2,000 were dirtied meanwhile: 12 ms of pause another 12 ms round would remove.
    assert not switch_now(52.0, 300.0, 12.0, 262_144, 2_000, last_round=False)
    # A busy guest's dirty round: 2,114 pages sent, 818 dirtied meanwhile (shrank 2.6x): one more round.
    assert not switch_now(52.0, 300.0, 12.0, 2_114, 818, last_round=False)


@pytest.mark.parametrize(
    ("pause_ms", "sent", "left", "last_round", "why"),
    [
        (4.9, 2_000, 30, False, "what is left pauses the guest under 5 ms"),
        (12.0, 4_000, 2_001, False, "the set shrank less than 2x: another round buys little"),
        (12.0, 262_144, 2_000, True, "no round left"),
    ],
)
def test_within_the_limit_it_switches_over_when_a_round_buys_little(
    pause_ms: float, sent: int, left: int, last_round: bool, why: str
) -> None:
    assert switch_now(40.0 + pause_ms, 300.0, pause_ms, sent, left, last_round), why


def test_round_zero_is_followed_by_one_dirty_round_while_pages_are_left() -> None:
    # An idle guest: round 0 sent 262,155 pages, 4 were dirtied meanwhile; well within the limit, yet one more
    # (short) round runs, so that the stop-and-copy has nothing or next to nothing left.
    assert not switch_now(40.0, 150.0, 0.01, 262_155, 4, last_round=False, first=True)
    assert switch_now(40.0, 150.0, 0.0, 262_155, 0, last_round=False, first=True), "nothing left: switch over"
    assert switch_now(40.0, 150.0, 0.01, 262_155, 4, last_round=True, first=True), "no round left"
    assert switch_now(40.0, 150.0, 0.01, 4, 2, last_round=False), "after the first dirty round the usual rule"
