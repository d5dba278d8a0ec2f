"""The adversarial hypervisor against real processes: attacks on the sealed stream and on the tokens, made by a
man in the middle between the source daemon and the destination's migration listener.

Each attack ends with the VM running on exactly one host with intact memory that was never rolled back (the
memdirty checksum matches the model), or stopped — never running twice — and with no plaintext canary
(memdirty pages that crossed the wire, the guest's VMPCKs) in anything the untrusted side handled: the
proxy's bytes and both daemons' memory (``World.finish``).  What the firmware catches fails as one opaque
``IntegrityError`` at the destination; the source learns only "integrity check failed".
"""

from __future__ import annotations

import base64
import json
import random
import struct
from typing import Any

import pytest
from mig_world import Victim, World

from cvmotion.abi import wire
from cvmotion.abi.wire import BundleHeader, BundleType
from cvmotion.testing.adversary import Frame
from cvmotion.testing.canary import find_canaries, scan_process
from cvmotion.testing.hostcmd import forge_abort_token
from cvmotion.testing.tampering import (
    MoveToStream,
    On,
    Reorder,
    ReplayLater,
    bundle,
    control,
    drop,
    duplicate,
    flip,
    inject_before,
    rewrite,
    truncate,
)

pytestmark = pytest.mark.timeout(180)
SLOW = pytest.mark.slow  # the long tail: run with -m slow

A, B = "host-a", "host-b"
MEMORY, EPOCH, START = BundleType.MEMORY, BundleType.EPOCH_TOKEN, BundleType.START_TOKEN
SMALL_BUNDLES = {"pages_per_bundle": 64, "streams": 1}  # round 0 is then ~10 bundles on one stream
# A switchover forced after 3 epochs (the limit is never met, and forcing is opt-in).
ROUNDS = {"downtime_limit_ms": 0.01, "max_rounds": 3, "auto_converge": False, "force_switchover": True}


def refused(world: World, info: dict[str, Any]) -> dict[str, Any]:
    """The migration failed and the VM went back to running on the source — at once, or after the recovery
    poller fetched the destination's abort token (the statistics then say so)."""
    info = world.a.api("GET", f"/v1/migrations/{info['x-cvmotion']['id']}")
    assert info["status"] == "failed", info
    assert info["x-cvmotion"]["outcome"] == "resumed on source", info
    return info


def moved(world: World, info: dict[str, Any]) -> None:
    info = world.a.api("GET", f"/v1/migrations/{info['x-cvmotion']['id']}")
    assert info["x-cvmotion"]["outcome"] == "running on destination", info


def attacked_and_refused(world: World, victim: Victim, attack: Any, **options: Any) -> dict[str, Any]:
    info = world.migrate(victim, attack, **options)
    assert attack.fired.is_set(), "the attack never found its target frame"
    world.finish(victim, expect_host=A)
    assert victim.name not in world.b.vms()
    return refused(world, info)


def test_the_canary_scan_is_not_vacuous(attack_world: World, victim: Victim) -> None:
    """Positive control: the scanner finds the canaries where they legitimately are — the VM process's guest
    RAM (hardware) — and in any byte string that holds one."""
    pid = attack_world.a.vm_pid(victim.name)
    assert pid is not None
    assert 0 in scan_process(pid, victim.canaries).hits  # VMPCK0, in the secrets page of guest RAM
    assert find_canaries([b"..." + victim.canaries[-1] + b"..."], victim.canaries) == [len(victim.canaries) - 1]


# -- bits flipped in flight ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "region", ["page", "tag", pytest.param("header", marks=SLOW), pytest.param("mac", marks=SLOW), "gpa"]
)
def test_flipped_bit_in_a_memory_bundle(attack_world: World, victim: Victim, region: str) -> None:
    """One bit of a page's ciphertext, its tag, the header counters, the MBMD MAC or a GPA entry."""
    attacked_and_refused(attack_world, victim, On(bundle(MEMORY, pages=1), flip(region, random.Random(region))))


@pytest.mark.slow
def test_flipped_bit_in_the_guest_context(attack_world: World, victim: Victim) -> None:
    """The immutable-state bundle (VMPCKs, measurement, policy) is the first bundle; a flip there fails it."""
    attacked_and_refused(attack_world, victim, On(bundle(BundleType.IMMUTABLE_STATE), flip("mac", random.Random(3))))


# -- order, count and placement of bundles ------------------------------------------------------------


def test_reordered_bundles_within_a_stream(attack_world: World, victim: Victim) -> None:
    attack = Reorder(bundle(MEMORY, stream=0, epoch=0))
    attacked_and_refused(attack_world, victim, attack, **SMALL_BUNDLES)


def test_bundle_moved_to_another_stream(attack_world: World, victim: Victim) -> None:
    """Sent on stream 1's connection after stream 0's next bundle: stream 0's counter no longer matches."""
    attack = MoveToStream(bundle(MEMORY, stream=0, epoch=0), to=1)
    attacked_and_refused(attack_world, victim, attack, pages_per_bundle=64, streams=2)


def test_dropped_bundle(attack_world: World, victim: Victim) -> None:
    attacked_and_refused(attack_world, victim, On(bundle(MEMORY, epoch=0), drop, nth=1), **SMALL_BUNDLES)


@pytest.mark.slow
def test_duplicated_bundle(attack_world: World, victim: Victim) -> None:
    attacked_and_refused(attack_world, victim, On(bundle(MEMORY, epoch=0), duplicate, nth=1), **SMALL_BUNDLES)


def test_replayed_bundle_from_an_earlier_epoch(attack_world: World, victim: Victim) -> None:
    """A page of epoch 0 delivered again in epoch 1 would roll that page back: the epoch check refuses it."""
    attack = ReplayLater(bundle(MEMORY, stream=0, epoch=0, pages=1), bundle(stream=0, epoch=1))
    attacked_and_refused(attack_world, victim, attack, streams=1, **ROUNDS)


def test_replayed_bundle_from_an_earlier_session(attack_world: World, victim: Victim) -> None:
    """Bundles recorded from an earlier migration of the same VM (a different K_f) injected into a new one."""
    world = attack_world
    attacked_and_refused(world, victim, On(bundle(START), flip("mac", random.Random(1))))
    old = world.proxy.log(bundle(MEMORY, stream=0, pages=1))[:2]
    assert old
    attack = On(bundle(MEMORY, stream=0), inject_before(lambda f, p: old))
    attacked_and_refused(world, victim, attack)


@pytest.mark.parametrize("how", ["extra-page", pytest.param("forged-bundle", marks=SLOW), "swapped-gpas"])
def test_injected_pages(attack_world: World, victim: Victim, how: str) -> None:
    """Pages the source never sealed: appended to a bundle, a whole forged bundle, or two GPAs swapped."""

    def forge(f: Frame) -> Frame:
        h = BundleHeader.from_bytes(f.payload)
        if how == "extra-page":
            unit = f.payload[h.size : h.size + wire.PAGE_SIZE + wire.TAG_SIZE]
            return f.replace(payload=f.payload + unit)
        if how == "swapped-gpas":
            meta = bytearray(f.payload[: h.size])
            a, b = meta[32:40], meta[40:48]
            meta[32:40], meta[40:48] = b, a
            return f.replace(payload=bytes(meta) + f.payload[h.size :])
        # A new bundle that claims the next counters, with a MAC under a key the attacker made up.
        fake = BundleHeader(size=h.size, stream=h.stream, type=MEMORY, mb_counter=h.mb_counter, epoch=h.epoch,
                            iv_counter=h.iv_counter)  # fmt: skip
        return f.replace(payload=fake.to_bytes() + random.Random(how).randbytes(len(f.payload) - wire.HEADER_SIZE))

    attack = On(bundle(MEMORY, pages=2), rewrite(forge))
    attacked_and_refused(attack_world, victim, attack)


def test_truncated_stream(attack_world: World, victim: Victim) -> None:
    """Half a memory bundle, then the connections close."""
    attacked_and_refused(attack_world, victim, On(bundle(MEMORY, pages=2), truncate(keep=6000)))


# -- epoch and start tokens ---------------------------------------------------------------------------


@pytest.mark.slow
def test_withheld_epoch_token(attack_world: World, victim: Victim) -> None:
    """Without epoch 0's token, epoch 1 never opens at the destination (bounded by the I/O timeout)."""
    attacked_and_refused(attack_world, victim, On(bundle(EPOCH), drop), io_timeout_s=3.0, **ROUNDS)


def test_forged_epoch_token(attack_world: World, victim: Victim) -> None:
    """total_mb rewritten to hide a bundle (the MAC covers it)."""

    def lower_count(f: Frame) -> Frame:
        h = BundleHeader.from_bytes(f.payload)
        total = wire.parse_epoch_token_metadata(f.payload[wire.HEADER_SIZE : h.size - wire.MAC_SIZE])
        meta = struct.pack("<II", max(total - 1, 0), 0)
        return f.replace(payload=f.payload[: wire.HEADER_SIZE] + meta + f.payload[h.size - wire.MAC_SIZE :])

    attacked_and_refused(attack_world, victim, On(bundle(EPOCH), rewrite(lower_count)))


def test_forged_start_token(attack_world: World, victim: Victim) -> None:
    """The destination refuses it, becomes FAILED for ever and hands the source an abort token."""
    attacked_and_refused(attack_world, victim, On(bundle(START), flip("mac", random.Random(2))))


@pytest.mark.slow
def test_replayed_start_token_from_an_earlier_session(attack_world: World, victim: Victim) -> None:
    world = attack_world
    attacked_and_refused(world, victim, On(bundle(START), flip("mac", random.Random(4))))
    old = world.proxy.log(bundle(START))[0]
    attack = On(bundle(START), rewrite(lambda f: f.replace(payload=old.payload)))
    attacked_and_refused(world, victim, attack)


@pytest.mark.slow
def test_withheld_start_token(attack_world: World, victim: Victim) -> None:
    """The source is frozen after its start token; the destination times out, aborts and sends the token that
    lets the source resume (it never resumes on its own)."""
    attacked_and_refused(attack_world, victim, On(bundle(START), drop), io_timeout_s=3.0)


# -- verdicts -----------------------------------------------------------------------------------------


def test_forged_abort_token_after_commit(attack_world: World, victim: Victim) -> None:
    """The destination committed; the adversary turns "committed" into "aborted" with a token it made up.
    The source's firmware rejects the token, the source stays stopped, asks the destination, and retires."""
    world = attack_world

    def forged(f: Frame) -> Frame:
        token = forge_abort_token(bytes(16))
        message = {"type": "aborted", "reason": "forged", "token": base64.b64encode(token).decode()}
        return f.replace(payload=json.dumps(message).encode())

    attack = On(control("committed"), rewrite(forged))
    info = world.migrate(victim, attack)
    assert attack.fired.is_set()
    world.finish(victim, expect_host=B)
    moved(world, info)
    assert victim.name not in world.a.vms()


@pytest.mark.slow
def test_replayed_abort_token_from_an_earlier_session(attack_world: World, victim: Victim) -> None:
    """A genuine abort token — of an earlier session the destination really aborted — replaces "committed"."""
    world = attack_world
    attacked_and_refused(world, victim, On(bundle(START), flip("mac", random.Random(5))))
    old = world.proxy.log(control("aborted"))
    assert old, "the destination sent no abort token in the first session"
    attack = On(control("committed"), rewrite(lambda f: f.replace(payload=old[0].payload)))
    info = world.migrate(victim, attack)
    assert attack.fired.is_set()
    world.finish(victim, expect_host=B)
    moved(world, info)
