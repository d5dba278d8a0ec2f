"""Exhaustive model check of the migration op-state machines (firmware.opstate) under an adversary.

The hypervisor and the network are untrusted, so the adversary here is as strong as the design allows: it
drives *both* hosts' firmware command interfaces in any order, and it delivers any bundle ever produced, any
number of times, in any order (loss, duplication, reordering, replay), and it can crash either side. It cannot
forge MACs: bundles are modelled as the authenticated records the firmware would accept.

The guest writes pages while the source runs. Every reachable state is checked for:

1. at most one instance can run — the destination never runs (or commits) while the source could still run;
2. a committed or running destination holds the latest memory: exactly the source's memory when it froze.

The search runs the real ``ExportSession`` / ``ImportRules`` code, not a re-statement of it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import pytest

from cvmotion.abi.wire import BundleType
from cvmotion.errors import FirmwareError
from cvmotion.firmware.opstate import STATE_BUNDLES, ExportOpState, ExportSession, ImportOpState, ImportRules

PAGES: tuple[int, ...] = (0,)
STATE_KINDS = tuple(sorted(STATE_BUNDLES, key=int))


@dataclass(frozen=True)
class Bundle:
    stream: int
    kind: BundleType
    mb: int
    epoch: int
    iv: int
    gpa: int = -1
    version: int = 0
    total_mb: int = 0


@dataclass
class World:
    src: ExportSession
    src_mem: list[int]
    src_clean: list[bool]  # exported since the last write (what the firmware tracks for the start token)
    src_lost: bool
    writes: int
    started: bool
    produced: list[Bundle]
    dst: ImportRules
    dst_mem: list[int]
    dst_lost: bool
    abort_token: bool

    def key(self) -> tuple[object, ...]:
        s, d = self.src, self.dst
        if self.dst_lost or d.state is ImportOpState.FAILED:
            # A dead destination never runs again: its counters, memory and the bundles in flight are
            # irrelevant to every property, so all dead-destination states with the same source collapse.
            dst_key: tuple[object, ...] = ("dead", self.abort_token)
            produced: tuple[Bundle, ...] = ()
        else:
            dst_key = (
                d.state,
                d.epoch,
                d.received_in_epoch,
                tuple(sorted(d.mb_counters.items())),
                tuple(sorted(d.iv_next.items())),
                frozenset(d.gpas_in_epoch),
                frozenset(d.state_received),
                tuple(self.dst_mem),
                self.abort_token,
            )
            produced = tuple(self.produced)
        return (
            s.state,
            s.epoch,
            s.bundles_in_epoch,
            tuple(sorted(s.mb_counters.items())),
            tuple(sorted(s.iv_counters.items())),
            frozenset(s.state_exported),
            tuple(self.src_mem),
            tuple(self.src_clean),
            self.src_lost,
            self.writes,
            self.started,
            produced,
            dst_key,
        )


def _clone(w: World) -> World:
    s, d = w.src, w.dst
    src = ExportSession(
        state=s.state,
        epoch=s.epoch,
        bundles_in_epoch=s.bundles_in_epoch,
        mb_counters=dict(s.mb_counters),
        iv_counters=dict(s.iv_counters),
        state_exported=set(s.state_exported),
    )
    dst = ImportRules(
        state=d.state,
        epoch=d.epoch,
        received_in_epoch=d.received_in_epoch,
        mb_counters=dict(d.mb_counters),
        iv_next=dict(d.iv_next),
        gpas_in_epoch=set(d.gpas_in_epoch),
        state_received=set(d.state_received),
        abort_token_issued=d.abort_token_issued,
    )
    return World(
        src=src,
        src_mem=list(w.src_mem),
        src_clean=list(w.src_clean),
        src_lost=w.src_lost,
        writes=w.writes,
        started=w.started,
        produced=list(w.produced),
        dst=dst,
        dst_mem=list(w.dst_mem),
        dst_lost=w.dst_lost,
        abort_token=w.abort_token,
    )


def _src_can_execute(w: World) -> bool:
    return not w.src_lost and w.src.state in (ExportOpState.RUNNABLE, ExportOpState.LIVE_EXPORT)


def _produce(w: World, stream: int, kind: BundleType, units: int, **payload: int) -> None:
    mb, epoch, iv = w.src.next_slot(stream, units, kind)
    w.produced.append(Bundle(stream, kind, mb, epoch, iv, **payload))


def _deliver(w: World, b: Bundle) -> None:
    d = w.dst
    units = 1 if b.kind in (BundleType.MEMORY, *STATE_BUNDLES) else 0
    if not d.check_bundle(b.stream, b.kind, b.mb, b.epoch, b.iv):
        d.fail()
        return
    if b.kind is BundleType.MEMORY:
        if not d.claim_gpa(b.gpa):
            d.fail()
            return
        d.accept_bundle(b.stream, b.kind, units)
        w.dst_mem[b.gpa] = b.version
    elif b.kind is BundleType.EPOCH_TOKEN:
        d.accept_bundle(b.stream, b.kind, 0)
        if not d.close_epoch(b.total_mb):
            d.fail()
    elif b.kind is BundleType.START_TOKEN:
        d.accept_bundle(b.stream, b.kind, 0)
        if not d.commit(b.total_mb):
            d.fail()
    else:
        d.accept_bundle(b.stream, b.kind, units)


def _successors(w: World, max_writes: int, max_bundles: int, streams: int) -> list[World]:
    out: list[World] = []

    def step(action: object) -> None:
        nxt = _clone(w)
        try:
            action(nxt)  # type: ignore[operator]
        except FirmwareError:
            return  # the firmware refused the command: no state change
        out.append(nxt)

    # The guest runs while the source may execute.
    if _src_can_execute(w) and w.writes < max_writes:
        for p in PAGES:

            def write(n: World, p: int = p) -> None:
                n.src_mem[p] += 1
                n.src_clean[p] = False
                n.writes += 1

            step(write)
    if not w.src_lost:
        if not w.started:

            def start(n: World) -> None:
                n.src.start()
                n.started = True

            step(start)
        if len(w.produced) < max_bundles:
            for s in range(streams):
                for p in PAGES:

                    def export_page(n: World, s: int = s, p: int = p) -> None:
                        _produce(n, s, BundleType.MEMORY, 1, gpa=p, version=n.src_mem[p])
                        n.src_clean[p] = True

                    step(export_page)
                if not w.src.state_exported:

                    def export_state(n: World, s: int = s) -> None:
                        for kind in STATE_KINDS:
                            _produce(n, s, kind, 1)

                    step(export_state)

                def epoch_token(n: World, s: int = s) -> None:
                    total = n.src.close_epoch()
                    mb, _, iv = n.src.next_slot(s, 0, BundleType.EPOCH_TOKEN)
                    n.produced.append(Bundle(s, BundleType.EPOCH_TOKEN, mb, n.src.epoch - 1, iv, total_mb=total))

                step(epoch_token)

                def start_token(n: World, s: int = s) -> None:
                    total = n.src.emit_start_token(all_pages_clean=all(n.src_clean))
                    mb, epoch, iv = n.src.next_slot(s, 0, BundleType.START_TOKEN)
                    n.produced.append(Bundle(s, BundleType.START_TOKEN, mb, epoch, iv, total_mb=total))

                step(start_token)
        step(lambda n: n.src.pause())
        step(lambda n: n.src.abort_local())
        if w.abort_token:
            step(lambda n: n.src.abort_with_token())
        step(lambda n: n.src.decommission())

        def crash_src(n: World) -> None:
            n.src_lost = True

        step(crash_src)
    if not w.dst_lost:
        for b in dict.fromkeys(w.produced):  # replay: any produced bundle, any number of times

            def deliver(n: World, b: Bundle = b) -> None:
                _deliver(n, b)

            step(deliver)

        def abort(n: World) -> None:
            if n.dst.issue_abort_token():
                n.abort_token = True

        step(abort)
        step(lambda n: n.dst.activate())

        def crash_dst(n: World) -> None:
            n.dst_lost = True

        step(crash_dst)
    return out


def _check(w: World) -> str | None:
    dst_live = not w.dst_lost and w.dst.committed
    if dst_live and _src_can_execute(w):
        return "fork: destination committed while the source can still run"
    if dst_live and w.dst_mem != w.src_mem:
        return f"stale memory: destination {w.dst_mem} != source {w.src_mem}"
    if w.dst.state is ImportOpState.RUNNABLE and w.src.state not in (
        ExportOpState.POST_EXPORT,
        ExportOpState.DECOMMISSIONED,
    ):
        return "destination runs but the source is not frozen"
    return None


def explore(max_writes: int, max_bundles: int, streams: int) -> tuple[int, int]:
    initial = World(
        src=ExportSession(),
        src_mem=[1] * len(PAGES),
        src_clean=[False] * len(PAGES),
        src_lost=False,
        writes=0,
        started=False,
        produced=[],
        dst=ImportRules(),
        dst_mem=[0] * len(PAGES),
        dst_lost=False,
        abort_token=False,
    )
    seen = {initial.key()}
    queue = deque([initial])
    commits = 0
    while queue:
        w = queue.popleft()
        problem = _check(w)
        assert problem is None, f"{problem} in {w}"
        if w.dst.state is ImportOpState.RUNNABLE:
            commits += 1
        for n in _successors(w, max_writes, max_bundles, streams):
            k = n.key()
            if k not in seen:
                seen.add(k)
                queue.append(n)
    return len(seen), commits


def test_model_single_stream() -> None:
    # ~34k states, a few seconds: the default suite's bound.
    states, commits = explore(max_writes=1, max_bundles=6, streams=1)
    # The honest path (export both pages, state, start token, commit, activate) must be reachable, or the
    # check would be vacuous.
    assert commits > 0
    assert states > 1000


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    ("max_writes", "max_bundles", "streams"),
    [(2, 8, 1), (1, 7, 2)],
    ids=["two-writes-8-bundles", "two-streams"],
)
def test_model_wider(max_writes: int, max_bundles: int, streams: int) -> None:
    # Hundreds of thousands of states: minutes; run with `pytest -m slow`.
    states, commits = explore(max_writes=max_writes, max_bundles=max_bundles, streams=streams)
    assert commits > 0
    assert states > 100_000
