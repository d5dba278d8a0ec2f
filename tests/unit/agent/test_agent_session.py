"""agent sessions between two emulated secure processors: the honest path, negotiation and policy outcomes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from agent_harness import (
    FakeClock,
    Host,
    NullHardware,
    Pair,
    default_policy,
    make_host,
    reconfigure,
    trust_for,
)

from cvmotion.abi.snp import GuestPolicy, PolicyFlag, Product, TcbVersion
from cvmotion.abi.wire import BundleType
from cvmotion.agent.hello import Role, VersionRange
from cvmotion.agent.pool import PoolAuthority
from cvmotion.agent.session import SessionState
from cvmotion.agent.source import SourceSession
from cvmotion.attestation.policy import TcbMinimum
from cvmotion.attestation.trust import PlatformKind
from cvmotion.errors import PolicyViolation, ProtocolError, UsageError, VerificationError
from cvmotion.firmware.opstate import ExportOpState
from cvmotion.firmware.vendor import Vendor

EST = (SessionState.ESTABLISHED, SessionState.ESTABLISHED)
FAILED = (SessionState.FAILED, SessionState.FAILED)


def test_honest_session_establishes_both_ends(src: Host, dst: Host) -> None:
    pair = Pair(src, dst, default_policy())
    pair.run()
    assert pair.both() == EST, (pair.source.error, pair.destination.error)
    s, d = pair.source.result, pair.destination.result
    assert s is not None
    assert d is not None
    assert (s.role, d.role, s.version, d.version) == (Role.SOURCE, Role.DESTINATION, 1, 1)
    assert s.session_id == d.session_id == pair.session_id
    assert (s.peer.chip_id, d.peer.chip_id) == (dst.chip_id, src.chip_id)
    assert s.peer.product is Product.GENOA
    assert s.peer.platform is PlatformKind.EMULATED
    assert s.peer.reported_tcb == dst.sp.platform_status().reported_tcb
    assert s.peer.ma_measurement == d.peer.ma_measurement == src.identity.measurement
    assert (s.peer.pool, d.peer.pool) == ("pool-a", "pool-a")
    info = src.sp.guest_info(pair.handle)
    assert s.guest == d.guest
    assert (d.guest.policy, d.guest.measurement, d.guest.host_data) == (info.policy, info.measurement, info.host_data)
    assert "destination pool pool-a allowed" in s.policy_checks
    assert "this host's pool is allowed" in d.policy_checks


def test_established_keys_drive_the_firmware_stream(src: Host, dst: Host) -> None:
    """K_f opens the source's sealed bundles at the destination; K_b authenticates the destination's abort token."""
    pair = Pair(src, dst, default_policy())
    pair.run()
    assert pair.both() == EST
    mig_src, mig_dst = src.sp.migration, dst.sp.migration
    mig_src.export_start(pair.handle, NullHardware())
    assert mig_dst.import_bundle(pair.ref, mig_src.export_immutable(pair.handle, 0)) is BundleType.IMMUTABLE_STATE
    mig_src.export_abort_with_token(pair.handle, mig_dst.import_abort(pair.ref))
    assert mig_src.export_status(pair.handle) == ExportOpState.RUNNABLE.value


def test_no_key_material_leaves_the_agents(
    emulated_vendor: Vendor, tmp_path: Path, pool_ca: PoolAuthority, clock: FakeClock
) -> None:
    keys: list[bytes] = []
    src = make_host(emulated_vendor, tmp_path / "s", pool_ca, clock, capture=keys)
    dst = make_host(emulated_vendor, tmp_path / "d", pool_ca, clock, capture=keys)
    pair = Pair(src, dst, default_policy())
    pair.run()
    assert pair.both() == EST
    assert len(keys) == 2
    assert all(len(k) == 32 for k in keys)
    outputs = [frame for _, frame in pair.relayed]
    outputs += [repr(pair.source.result).encode(), repr(pair.destination.result).encode()]
    for key in keys:
        for fragment in (key, key[:16], key[16:], key.hex().encode()):
            assert not any(fragment in out for out in outputs)


@pytest.mark.parametrize(
    ("src_range", "dst_range", "chosen"),
    [((1, 2), (1, 1), 1), ((1, 1), (1, 2), 1), ((1, 2), (1, 2), 2)],
    ids=["src-newer", "dst-newer", "both-2"],
)
def test_version_negotiation(
    src: Host, dst: Host, src_range: tuple[int, int], dst_range: tuple[int, int], chosen: int
) -> None:
    pair = Pair(
        reconfigure(src, versions=VersionRange(*src_range)),
        reconfigure(dst, versions=VersionRange(*dst_range)),
        default_policy(),
    )
    pair.run()
    assert pair.both() == EST
    assert pair.source.version == pair.destination.version == chosen


def test_disjoint_versions_abort_with_a_clear_error(src: Host, dst: Host) -> None:
    pair = Pair(reconfigure(src, versions=VersionRange(2, 2)), dst, default_policy())
    pair.run()
    assert pair.both() == FAILED
    assert isinstance(pair.destination.error, ProtocolError)
    assert "no common protocol version: source speaks 2..2, destination 1..1" in str(pair.destination.error)
    assert "aborted (VERSION)" in str(pair.source.error)


def _expect_policy(pair: Pair, judge: Role, *needles: str) -> PolicyViolation:
    pair.run()
    assert pair.both() == FAILED
    judged, other = (pair.source, pair.destination) if judge is Role.SOURCE else (pair.destination, pair.source)
    assert isinstance(judged.error, PolicyViolation), judged.error
    text = "\n".join(judged.error.violations)
    for needle in needles:
        assert needle in text
    assert isinstance(other.error, PolicyViolation)  # told inside TLS: the peer's reasons, as violations
    assert all(v.startswith("the ") for v in other.error.violations)
    return judged.error


def test_wrong_ma_measurement(
    emulated_vendor: Vendor, tmp_path: Path, pool_ca: PoolAuthority, clock: FakeClock
) -> None:
    rogue_ma = make_host(emulated_vendor, tmp_path / "d", pool_ca, clock, image=b"some other MA build")
    src = make_host(emulated_vendor, tmp_path / "s", pool_ca, clock)
    _expect_policy(Pair(src, rogue_ma, default_policy()), Role.SOURCE, "destination MA measurement")


def test_destination_tcb_below_the_guests_minimum(src: Host, dst: Host) -> None:
    policy = default_policy(minimum_tcb=TcbMinimum(snp=30))
    _expect_policy(Pair(src, dst, policy), Role.SOURCE, "destination REPORTED_TCB is below", "snp=25 < 30")


def test_destination_outside_the_allowed_pools(
    emulated_vendor: Vendor, tmp_path: Path, pool_ca: PoolAuthority, clock: FakeClock
) -> None:
    src = make_host(emulated_vendor, tmp_path / "s", pool_ca, clock)
    dst = make_host(emulated_vendor, tmp_path / "d", pool_ca, clock, pool="pool-b")
    _expect_policy(Pair(src, dst, default_policy()), Role.SOURCE, "in pool 'pool-b'")


def test_revoked_destination(src: Host, dst: Host) -> None:
    src = reconfigure(src, revoked_chip_ids=frozenset({dst.chip_id}))
    _expect_policy(Pair(src, dst, default_policy()), Role.SOURCE, "destination chip", "is revoked")


def test_revoked_destination_tcb(src: Host, dst: Host) -> None:
    tcb = dst.sp.platform_status().reported_tcb
    src = reconfigure(src, revoked_tcbs=frozenset({(Product.GENOA, tcb)}))
    _expect_policy(Pair(src, dst, default_policy()), Role.SOURCE, "is revoked for Genoa")


def test_debug_guest_under_a_no_debug_policy(src: Host, dst: Host) -> None:
    debug = PolicyFlag.RESERVED_MBO | PolicyFlag.SMT | PolicyFlag.MIGRATE_MA | PolicyFlag.DEBUG
    _expect_policy(Pair(src, dst, default_policy(), guest_policy=GuestPolicy(flags=debug)), Role.SOURCE, "DEBUG set")


def test_policy_svn_rollback(src: Host, dst: Host) -> None:
    pair = Pair(reconfigure(src, policy_svn=7), reconfigure(dst, policy_svn=6), default_policy())
    _expect_policy(pair, Role.SOURCE, "policy_svn rollback: destination 6 < source 7")


def test_backward_policy_destination_refuses_a_revoked_source(src: Host, dst: Host) -> None:
    dst = reconfigure(dst, revoked_chip_ids=frozenset({src.chip_id}))
    pair = Pair(src, dst, default_policy())
    _expect_policy(pair, Role.DESTINATION, "source chip", "is revoked")
    assert src.sp.migration.export_status(pair.handle) == ExportOpState.RUNNABLE.value  # no K_f was ever made


def test_every_violation_is_listed(src: Host, dst: Host, emulated_vendor: Vendor, tmp_path: Path,
                                   pool_ca: PoolAuthority, clock: FakeClock) -> None:  # fmt: skip
    far = make_host(emulated_vendor, tmp_path / "far", pool_ca, clock, pool="pool-z", policy_svn=1)
    src = reconfigure(src, policy_svn=2, revoked_chip_ids=frozenset({far.chip_id}))
    policy = default_policy(minimum_tcb=TcbMinimum(boot_loader=11, snp=26))
    error = _expect_policy(
        Pair(src, far, policy), Role.SOURCE, "boot_loader=10 < 11", "snp=25 < 26", "revoked", "pool-z", "rollback"
    )
    assert len(error.violations) == 4


def test_different_product_family(
    emulated_vendor: Vendor, tmp_path: Path, pool_ca: PoolAuthority, clock: FakeClock
) -> None:
    trust = trust_for((emulated_vendor, Product.GENOA), (emulated_vendor, Product.MILAN))
    src = make_host(emulated_vendor, tmp_path / "s", pool_ca, clock, trust=trust)
    milan = make_host(emulated_vendor, tmp_path / "m", pool_ca, clock, trust=trust, product=Product.MILAN)
    policy = default_policy(minimum_tcb=None)
    _expect_policy(Pair(src, milan, policy), Role.SOURCE, "product family: source is Genoa, destination Milan")


def test_policy_document_must_match_host_data(src: Host, dst: Host) -> None:
    pair = Pair(src, dst, default_policy(), policy_doc=default_policy(allowed_pools=("anywhere",)).canonical())
    assert pair.source.start() == []
    assert pair.source.state is SessionState.FAILED
    assert isinstance(pair.source.error, PolicyViolation)
    assert "is not the guest's HOST_DATA" in str(pair.source.error)
    with pytest.raises(ProtocolError, match="failed"):
        pair.source.receive(b"anything")


def test_non_canonical_document_is_refused_even_if_bound(src: Host, dst: Host) -> None:
    doc = default_policy().canonical().replace(b",", b", ")
    handle = src.sp.launch_start(0x70000)  # SMT, reserved bit 17, MIGRATE_MA
    src.sp.launch_finish(handle, host_data=hashlib.sha256(doc).digest())
    src.sp.activate(handle)
    session = SourceSession(src.identity, handle, doc, src.config)
    assert session.start() == []
    assert isinstance(session.error, UsageError)
    assert "canonical" in str(session.error)


def test_non_genuine_destination_chip(
    emulated_vendor: Vendor, rogue_vendor: Vendor, tmp_path: Path, pool_ca: PoolAuthority, clock: FakeClock
) -> None:
    src = make_host(emulated_vendor, tmp_path / "s", pool_ca, clock)
    rogue = make_host(rogue_vendor, tmp_path / "r", pool_ca, clock, trust=trust_for((emulated_vendor, Product.GENOA)))
    pair = Pair(src, rogue, default_policy())
    pair.run()
    assert pair.both() == FAILED
    assert isinstance(pair.source.error, VerificationError)
    assert "not a trusted root" in str(pair.source.error)
    assert isinstance(pair.destination.error, VerificationError)
    assert "rejected this MA's evidence" in str(pair.destination.error)


def test_non_genuine_source_chip_is_refused_before_the_destination_attests(
    emulated_vendor: Vendor, rogue_vendor: Vendor, tmp_path: Path, pool_ca: PoolAuthority, clock: FakeClock
) -> None:
    rogue = make_host(rogue_vendor, tmp_path / "r", pool_ca, clock, trust=trust_for((emulated_vendor, Product.GENOA)))
    dst = make_host(emulated_vendor, tmp_path / "d", pool_ca, clock)
    pair = Pair(rogue, dst, default_policy())
    pair.run()
    assert pair.both() == FAILED
    assert "not a trusted root" in str(pair.destination.error)
    assert [d for d, _ in pair.relayed] == ["s2d", "d2s"]  # HELLO, then the ERROR: no destination HELLO


def test_a_newer_destination_tcb_passes(src: Host, dst: Host) -> None:
    dst.sp.update_tcb(TcbVersion(boot_loader=10, snp=27, microcode=84))
    pair = Pair(src, dst, default_policy(minimum_tcb=TcbMinimum(snp=27)))
    pair.run()
    assert pair.both() == EST
    assert pair.source.result is not None
    assert pair.source.result.peer.reported_tcb.snp == 27
