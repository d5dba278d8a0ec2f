"""Attacks on the migration agents' session set-up and destinations the VM's policy must refuse, through real
processes: the relay rewrites or replays MA frames on the control connection; destinations are other real
hosts (another pool, older firmware, a chip from a vendor nobody trusts).

Every case must fail during set-up — before the source firmware starts an export, so the VM never pauses —
name the reason (all policy violations, or the verification failure), leave no VM on the destination, and
leak nothing (``World.finish``).  Policy failures never fall back to anything weaker.
"""

from __future__ import annotations

import base64
import random
from dataclasses import replace
from typing import Any

import pytest
from mig_world import UPDATED_SNP, Victim, World

from cvmotion.abi.snp import PolicyFlag, Product
from cvmotion.agent.hello import VersionRange
from cvmotion.agent.policy import MigrationPolicy
from cvmotion.agent.wire import FrameType
from cvmotion.attestation.policy import TcbMinimum
from cvmotion.firmware.chip import default_tcb
from cvmotion.host.daemon import DEFAULT_GUEST_POLICY
from cvmotion.testing.adversary import Direction, Frame
from cvmotion.testing.tampering import On, ma, ma_hello, rewrite, rewrite_ma_hello, substitute_ratls_key

pytestmark = pytest.mark.timeout(180)

A = "host-a"
FACTORY = default_tcb(Product.GENOA)  # host-c's firmware
TCB = replace(FACTORY, snp=UPDATED_SNP)  # host-a's and host-b's (conftest)


def refused_at_setup(world: World, victim: Victim, info: dict[str, Any], *expected: str) -> str:
    """Failed before any export (no round, no bundle), VM running on the source, reason named."""
    assert info["status"] == "failed", info
    assert info["x-cvmotion"]["outcome"] == "resumed on source", (info.get("error-desc"), info["x-cvmotion"])
    assert not info["x-cvmotion"]["rounds"], info
    text = str(info.get("error-desc", ""))
    for part in expected:
        assert part in text, text
    world.finish(victim, expect_host=A)
    return text


def policy_doc(**fields: Any) -> str:
    return base64.b64encode(MigrationPolicy(**{"allowed_pools": ("pool-a",), **fields}).canonical()).decode()


@pytest.fixture
def vm_with(attack_world: World, request: pytest.FixtureRequest) -> Any:
    """Make a VM with extra create fields (guest policy, migration policy) for one test; removed afterwards."""
    made: list[Victim] = []

    def make(**create: Any) -> Victim:
        seed = random.Random(request.node.nodeid).randrange(1 << 24)
        victim = attack_world.new_vm(f"p{seed:06x}", seed=seed, **create)
        made.append(victim)
        return victim

    yield make
    for victim in made:
        attack_world.drop_vm(victim)


# -- the relay on the MA session ----------------------------------------------------------------------


def test_protocol_version_downgrade(attack_world: World, victim: Victim) -> None:
    """Both MAs speak 1..2; the relay rewrites the source's HELLO to 1..1 so the destination picks 1."""
    downgrade = rewrite(lambda f: rewrite_ma_hello(f, versions=VersionRange(1, 1)))
    attack = On(ma(Direction.FORWARD, FrameType.HELLO), downgrade)
    info = attack_world.migrate(victim, attack)
    assert attack.fired.is_set()
    refused_at_setup(attack_world, victim, info, "version downgrade")


def test_relay_key_substitution(attack_world: World, victim: Victim) -> None:
    """The relay's key in the destination's RA-TLS certificate, the genuine report copied in."""
    attack = On(ma(Direction.BACKWARD, FrameType.HELLO), rewrite(substitute_ratls_key))
    info = attack_world.migrate(victim, attack)
    assert attack.fired.is_set()
    refused_at_setup(attack_world, victim, info, "REPORT_DATA")


@pytest.mark.slow
def test_stale_report_from_an_earlier_session(attack_world: World, victim: Victim) -> None:
    """The destination MA's genuine certificate of an earlier session: its evidence verifies, but the relay
    cannot prove possession of that key in this session's TLS handshake."""
    world = attack_world
    first = world.migrate(victim, On(ma(Direction.BACKWARD, FrameType.HELLO), rewrite(substitute_ratls_key)))
    refused_at_setup(world, victim, first)
    old = ma_hello(world.proxy.log(ma(Direction.BACKWARD, FrameType.HELLO))[0]).certificate
    attack = On(ma(Direction.BACKWARD, FrameType.HELLO), rewrite(lambda f: rewrite_ma_hello(f, certificate=old)))
    info = world.migrate(victim, attack)
    assert attack.fired.is_set()
    refused_at_setup(world, victim, info, "not the attested one")


@pytest.mark.slow
def test_corrupted_tls_record(attack_world: World, victim: Victim) -> None:
    def corrupt(f: Frame) -> Frame:
        data = bytearray(f.payload)
        data[-1] ^= 0x01
        return f.replace(payload=bytes(data))

    attack = On(ma(Direction.BACKWARD, FrameType.TLS), rewrite(corrupt))
    info = attack_world.migrate(victim, attack)
    assert attack.fired.is_set()
    refused_at_setup(attack_world, victim, info, "TLS")


# -- destinations the policy refuses ------------------------------------------------------------------


def test_destination_below_the_minimum_tcb(attack_world: World, vm_with: Any) -> None:
    """The VM requires SNP SPL above what host-b's firmware reports."""
    minimum = TcbMinimum(boot_loader=TCB.boot_loader, tee=TCB.tee, snp=TCB.snp + 1, microcode=TCB.microcode)
    victim = vm_with(migration_policy=policy_doc(minimum_tcb=minimum))
    info = attack_world.migrate(victim)
    refused_at_setup(attack_world, victim, info, "minimum_tcb", f"snp={TCB.snp} < {TCB.snp + 1}")


@pytest.mark.slow
def test_destination_running_older_firmware(attack_world: World, vm_with: Any) -> None:
    """host-c still runs the factory firmware; the VM requires the update host-a and host-b installed
    (``cvmotion platform set-tcb --snp``)."""
    world = attack_world
    host_c = world.extra_host("host-c", pool="pool-c")
    minimum = TcbMinimum(boot_loader=TCB.boot_loader, tee=TCB.tee, snp=TCB.snp, microcode=TCB.microcode)
    victim = vm_with(migration_policy=policy_doc(allowed_pools=("pool-a", "pool-c"), minimum_tcb=minimum))
    info = world.wait_migration(world.start_migration(victim, destination=host_c.url))
    text = refused_at_setup(world, victim, info, "minimum_tcb", f"snp={FACTORY.snp} < {TCB.snp}")
    assert "pool" not in text
    assert victim.name not in host_c.vms()


@pytest.mark.slow
def test_destination_outside_the_allowed_pools(attack_world: World, victim: Victim) -> None:
    world = attack_world
    host_c = world.extra_host("host-c", pool="pool-c")
    info = world.wait_migration(world.start_migration(victim, destination=host_c.url))
    refused_at_setup(world, victim, info, "pool-c", "allowed_pools")
    assert victim.name not in host_c.vms()


@pytest.mark.slow
def test_non_genuine_chip(attack_world: World, victim: Victim) -> None:
    """host-d's chip was made by a second emulated vendor whose ARK no MA trusts."""
    world = attack_world
    host_d = world.extra_host("host-d", vendor_dir=world.root.parent / "vendor-rogue")
    info = world.wait_migration(world.start_migration(victim, destination=host_d.url))
    refused_at_setup(world, victim, info, "not a trusted root")
    assert victim.name not in host_d.vms()


def test_wrong_ma_measurement(attack_world: World, vm_with: Any) -> None:
    """The VM allows only an MA build whose launch digest is not the one the destination runs."""
    other = bytes(random.Random(9).randbytes(48))
    victim = vm_with(migration_policy=policy_doc(allowed_ma_measurements=(other,)))
    info = attack_world.migrate(victim)
    refused_at_setup(attack_world, victim, info, "allowed_ma_measurements")


def test_debug_guest_under_a_no_debug_policy(attack_world: World, vm_with: Any) -> None:
    victim = vm_with(policy=DEFAULT_GUEST_POLICY | int(PolicyFlag.DEBUG))
    info = attack_world.migrate(victim)
    refused_at_setup(attack_world, victim, info, "DEBUG")
