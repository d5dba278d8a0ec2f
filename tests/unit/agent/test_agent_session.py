"""agent session: an honest session between two emulated secure processors, and what it establishes."""

from __future__ import annotations

from agent_harness import Host, Pair, default_policy

from cvmotion.agent.session import SessionState


def test_honest_session_establishes_both_ends(src: Host, dst: Host) -> None:
    pair = Pair(src, dst, default_policy())
    pair.run()
    assert pair.source.error is None, pair.source.error
    assert pair.destination.error is None, pair.destination.error
    assert pair.both() == (SessionState.ESTABLISHED, SessionState.ESTABLISHED)
